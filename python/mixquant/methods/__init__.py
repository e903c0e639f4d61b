"""Quantization methods behind :func:`mixquant.quantize`.

Each method is an options dataclass plus a function ``(model, job, options) ->
MethodResult`` that quantizes a model copy in place:

* ``"asymmetric"``: :class:`AsymmetricOptions`, :func:`quantize_asymmetric`
  (round-to-nearest weights, min/max activation ranges);
* ``"brecq"``: :class:`BrecqOptions`, :func:`quantize_brecq` (BN folding,
  block reconstruction with AdaRound, learned activation step sizes).
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple, Type

from .asymmetric import AsymmetricOptions, quantize_asymmetric
from .blocks import is_block, register_block, registered_blocks
from .brecq import BrecqOptions, BrecqReport, UnitRecord, quantize_brecq
from .common import MethodResult, QuantJob

METHODS: Dict[str, Tuple[Type, Callable]] = {
    "asymmetric": (AsymmetricOptions, quantize_asymmetric),
    "brecq": (BrecqOptions, quantize_brecq),
}

__all__ = [
    "METHODS",
    "AsymmetricOptions",
    "BrecqOptions",
    "BrecqReport",
    "UnitRecord",
    "MethodResult",
    "QuantJob",
    "is_block",
    "register_block",
    "registered_blocks",
    "quantize_asymmetric",
    "quantize_brecq",
]
