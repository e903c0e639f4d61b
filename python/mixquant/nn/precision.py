"""Running float16/bfloat16 models in float32 while they are quantized, and storing them back.

The quantization methods compute in float32 (BRECQ's reconstruction mixes the
model's tensors with float32 rounding variables). A model holding float16 or
bfloat16 tensors is converted to float32 for the work, and afterwards every
tensor goes back to its own dtype: quantized weights as their grid values
rounded to that dtype (:func:`mixquant.nn.qmodules.grid_codes` checks that the
codes can still be read back from them), everything else as it was.
"""

from __future__ import annotations

import itertools
from typing import Dict

import torch
import torch.nn as nn

from . import qmodules

__all__ = ["LOW_PRECISION", "max_bits_for", "to_float32", "restore_dtypes"]

LOW_PRECISION = (torch.float16, torch.bfloat16)

# Bits of significand (implicit bit included). Rounding a grid value to such a
# dtype moves it by at most (2**bits - 1) * 2**-significand grid steps; below
# 1.5 steps the code is recovered from the stored weight by rounding and a
# check of the two neighbours (grid_codes), so these are the widest grids each
# dtype can carry: bfloat16 8 bits, float16 11 bits.
_SIGNIFICAND = {torch.float16: 11, torch.bfloat16: 8}


def max_bits_for(dtype: torch.dtype) -> int:
    """The widest weight bit-width whose codes a weight of ``dtype`` can carry (16 for float32/float64)."""
    p = _SIGNIFICAND.get(dtype)
    if p is None:
        return 16
    bits = 1
    while (2 ** (bits + 1) - 1) * 2.0**-p < 1.5:
        bits += 1
    return bits


def _tensors(model: nn.Module):
    return itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))


def to_float32(model: nn.Module) -> Dict[str, torch.dtype]:
    """Convert every float16/bfloat16 parameter and buffer of ``model`` to float32, in place.

    Returns ``{name: original dtype}`` of the converted tensors (empty for a float32 model).
    """
    dtypes: Dict[str, torch.dtype] = {}
    for name, t in _tensors(model):
        if t.dtype in LOW_PRECISION:
            dtypes[name] = t.dtype
            t.data = t.data.float()
    return dtypes


def restore_dtypes(model: nn.Module, dtypes: Dict[str, torch.dtype]) -> None:
    """Cast the tensors named in ``dtypes`` (from :func:`to_float32`) back to their dtypes, in place.

    A tensor created meanwhile (the bias a folded batch norm leaves) takes the
    dtype of its module's weight; the quantization parameters mixquant attached
    (weight scales and zero points, activation quantizers) keep their own dtypes.
    """
    if not dtypes:
        return
    for module_name, module in model.named_modules():
        if isinstance(module, qmodules.ActQuantizer):
            continue
        prefix = f"{module_name}." if module_name else ""
        owned = itertools.chain(module._parameters.items(), module._buffers.items())
        for key, t in owned:
            if t is None or not t.is_floating_point() or key == "weight_scale":
                continue
            dtype = dtypes.get(prefix + key)
            if dtype is None and key != "weight":
                dtype = dtypes.get(prefix + "weight")  # new in this module: follow its weight
            if dtype is not None and t.dtype != dtype:
                t.data = t.data.to(dtype)
