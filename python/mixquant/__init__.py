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

import importlib
from typing import TYPE_CHECKING, Any, List

# The public names and the module each comes from. They are imported on first
# use (PEP 562), so that ``import mixquant`` and ``mixquant --help`` do not load
# torch, and the command line can set up the process (OpenMP's wait policy)
# before torch starts its thread pool. Add a public name here, not as an import.
_EXPORTS = {
    "BitConfig": "allocation.bitconfig",
    "QuantInfo": "api.quantize", "quant_info": "api.quantize", "quantize": "api.quantize",
    "search": "api.search", "uniform": "api.search", "keep_first_last": "api.search",
    "first_last_layers": "nn.order",
    "get_backend": "core.backend", "set_backend": "core.backend", "set_simd_level": "core.backend",
    "simd_level": "core.backend", "supported_simd_levels": "core.backend", "use_backend": "core.backend",
    "use_simd_level": "core.backend",
    "prepare_process": "core.runtime",
    "BRECQ_PRESETS": "presets", "brecq_preset": "presets",
    "RoundoffError": "core.error", "roundoff_error": "core.error",
    "dequantize_tensor": "core.kernels", "fake_quantize_tensor": "core.kernels", "pack_bits": "core.kernels",
    "quantize_tensor": "core.kernels", "unpack_bits": "core.kernels", "unpack_dequantize": "core.kernels",
    "packed_matvec": "core.kernels",
    "ClipSearchResult": "core.ranges", "choose_qparams": "core.ranges", "clip_search": "core.ranges",
    "ExportInfo": "io.export", "export": "io.export", "load_quantized": "io.export",
    "OnnxExportInfo": "io.onnx_export", "export_onnx": "io.onnx_export",
    "search_checkpoint": "api.checkpoint",
    "AsymmetricOptions": "methods.asymmetric",
    "register_block": "methods.blocks",
    "BrecqOptions": "methods.brecq", "BrecqReport": "methods.brecq",
    "fold_bn": "nn.fold",
    "channel_axis": "nn.layers", "find_layers": "nn.layers", "register_quantizable": "nn.layers",
    "RankFailure": "parallel",
}

if TYPE_CHECKING:  # what static tools see; at run time the names resolve in __getattr__
    from .allocation.bitconfig import BitConfig
    from .api.quantize import QuantInfo, quant_info, quantize
    from .api.checkpoint import search_checkpoint
    from .api.search import keep_first_last, search, uniform
    from .core.backend import (get_backend, set_backend, set_simd_level, simd_level, supported_simd_levels,
                               use_backend, use_simd_level)
    from .core.error import RoundoffError, roundoff_error
    from .core.kernels import (dequantize_tensor, fake_quantize_tensor, pack_bits, packed_matvec, quantize_tensor,
                                unpack_bits, unpack_dequantize)
    from .core.ranges import ClipSearchResult, choose_qparams, clip_search
    from .core.runtime import prepare_process
    from .io.export import ExportInfo, export, load_quantized
    from .io.onnx_export import OnnxExportInfo, export_onnx
    from .methods.asymmetric import AsymmetricOptions
    from .methods.blocks import register_block
    from .methods.brecq import BrecqOptions, BrecqReport
    from .nn.fold import fold_bn
    from .nn.layers import channel_axis, find_layers, register_quantizable
    from .nn.order import first_last_layers
    from .parallel import RankFailure
    from .presets import BRECQ_PRESETS, brecq_preset


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mixquant' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"

__all__ = [
    "AsymmetricOptions",
    "BRECQ_PRESETS",
    "brecq_preset",
    "first_last_layers",
    "keep_first_last",
    "prepare_process",
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
    "packed_matvec",
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
