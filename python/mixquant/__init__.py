"""mixquant: per-layer weight bit-widths from roundoff error (MixQuant), then quantization.

The search (:func:`search`) measures, for every quantizable layer and every
candidate bit-width, the quantize→dequantize roundoff error of the layer's
weights with a fused native kernel, and picks per-layer bits from that table
(:class:`BitConfig`). The config then drives a quantization method
(:func:`quantize`), and :func:`export` writes the result with packed integer weights.

The package's rooms, lower ones never importing higher ones (README, "Layout"):
``core`` (native kernels and their reference twins) < ``nn`` (model plumbing)
< ``allocation`` (error tables, rules, ``BitConfig``) and ``methods`` <
``api`` (``search``, ``quantize``) < ``io.export`` < this module < the studies
(``zoo``, ``experiments``) and ``cli``.
"""

from __future__ import annotations

from .allocation.bitconfig import BitConfig
from .api.quantize import QuantInfo, quant_info, quantize
from .api.checkpoint import search_checkpoint
from .api.search import search, uniform
from .core.backend import (
    get_backend,
    set_backend,
    set_simd_level,
    simd_level,
    supported_simd_levels,
    use_backend,
    use_simd_level,
)
from .core.error import RoundoffError, roundoff_error
from .core.kernels import (
    dequantize_tensor,
    fake_quantize_tensor,
    pack_bits,
    quantize_tensor,
    unpack_bits,
    unpack_dequantize,
)
from .core.ranges import ClipSearchResult, choose_qparams, clip_search
from .io.export import ExportInfo, export, load_quantized
from .io.onnx_export import OnnxExportInfo, export_onnx
from .methods.asymmetric import AsymmetricOptions
from .methods.blocks import register_block
from .methods.brecq import BrecqOptions, BrecqReport
from .nn.fold import fold_bn
from .nn.layers import channel_axis, find_layers, register_quantizable
from .parallel import RankFailure

__version__ = "0.1.0"

__all__ = [
    "AsymmetricOptions",
    "BitConfig",
    "BrecqOptions",
    "BrecqReport",
    "ExportInfo",
    "QuantInfo",
    "RankFailure",
    "export",
    "export_onnx",
    "OnnxExportInfo",
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
    "search_checkpoint",
    "set_backend",
    "set_simd_level",
    "simd_level",
    "supported_simd_levels",
    "uniform",
    "unpack_bits",
    "unpack_dequantize",
    "use_backend",
    "use_simd_level",
]
