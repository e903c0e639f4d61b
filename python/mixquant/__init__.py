"""mixquant: per-layer weight bit-widths from roundoff error (MixQuant), then quantization.

The search (:func:`search`) measures, for every quantizable layer and every
candidate bit-width, the quantize→dequantize roundoff error of the layer's
weights with a fused native kernel, and picks per-layer bits from that table
(:class:`BitConfig`). The config then drives a quantization method.
"""

from __future__ import annotations

from ._backend import (
    get_backend,
    set_backend,
    set_simd_level,
    simd_level,
    supported_simd_levels,
    use_backend,
    use_simd_level,
)
from .bitconfig import BitConfig
from .error import ClipSearchResult, RoundoffError, clip_search, roundoff_error
from .export import ExportInfo, export, load_quantized
from .fold import fold_bn
from .kernels import (
    choose_qparams,
    dequantize_tensor,
    fake_quantize_tensor,
    pack_bits,
    quantize_tensor,
    unpack_bits,
)
from .layers import channel_axis, find_layers, register_quantizable
from .methods.blocks import register_block
from .methods.asymmetric import AsymmetricOptions
from .methods.brecq import BrecqOptions, BrecqReport
from .quantize import QuantInfo, quant_info, quantize
from .search import search, uniform

__version__ = "0.1.0"

__all__ = [
    "AsymmetricOptions",
    "BitConfig",
    "BrecqOptions",
    "BrecqReport",
    "ExportInfo",
    "QuantInfo",
    "export",
    "fold_bn",
    "load_quantized",
    "quant_info",
    "quantize",
    "register_block",
    "ClipSearchResult",
    "RoundoffError",
    "channel_axis",
    "choose_qparams",
    "clip_search",
    "dequantize_tensor",
    "fake_quantize_tensor",
    "find_layers",
    "get_backend",
    "pack_bits",
    "quantize_tensor",
    "register_quantizable",
    "roundoff_error",
    "search",
    "set_backend",
    "set_simd_level",
    "simd_level",
    "supported_simd_levels",
    "uniform",
    "unpack_bits",
    "use_backend",
    "use_simd_level",
]
