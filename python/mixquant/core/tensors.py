"""Checking tensors and arguments, and handing tensors over to the native core.

Every kernel entry point funnels its inputs through these helpers: a weight
becomes a contiguous float32 CPU matrix ``[C, K]`` with channels on dim 0
(zero copy when it already is one), bit-widths and quantization parameters are
validated, and non-finite values are refused with the tensor's name.
"""

from __future__ import annotations

from typing import Iterable, List, Tuple

import numpy as np
import torch
from torch import nn

from . import reference
from .backend import native
from .limits import MAX_BITS, MIN_BITS

Tensor = torch.Tensor
FLT_MIN = float(torch.finfo(torch.float32).tiny)

__all__ = ["check_bits", "check_bit_list", "as_matrix", "restore_shape", "check_qparams", "finite_minmax",
           "group_count", "check_group_qparams", "finite_group_minmax", "widen_into"]


def check_bits(bits: object, name: str = "bits") -> int:
    """Validate one bit-width (an int in ``MIN_BITS..MAX_BITS``) and return it."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"{name} must be an int in {MIN_BITS}..{MAX_BITS}, got {type(bits).__name__}")
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f"{name} must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    return int(bits)


def check_bit_list(bits: Iterable[int], name: str = "bits") -> List[int]:
    """Validate a candidate set of bit-widths: non-empty, valid ints; returned sorted and unique."""
    if type(bits) is range and bits.step > 0 and len(bits) and MIN_BITS <= bits.start and bits[-1] <= MAX_BITS:
        return list(bits)  # the common case, already sorted and unique
    if isinstance(bits, (int, np.integer)) and not isinstance(bits, bool):
        bits = [bits]
    try:
        values = list(bits)
    except TypeError:
        raise TypeError(f"{name} must be an int or an iterable of ints, got {type(bits).__name__}") from None
    if not values:
        raise ValueError(f"{name} is empty: give at least one candidate bit-width")
    return sorted({check_bits(b, name) for b in values})


def as_matrix(w: Tensor, ch_axis: int = 0, name: str = "tensor") -> Tensor:
    """View ``w`` as a contiguous float32 CPU matrix ``[C, K]`` with channels on dim 0.

    Copies only when it must (another dtype, device, layout or channel axis).
    Raises TypeError for non-tensors and integer tensors, ValueError for empty ones.
    """
    if (type(w) is torch.Tensor or type(w) is nn.Parameter) and w.dtype is torch.float32 and ch_axis == 0 \
            and w.dim() >= 2 and w.device.type == "cpu" and w.layout is torch.strided and w.is_contiguous() \
            and w.numel() > 0:
        return w.detach().view(w.shape[0], -1)  # the common case: a float32 CPU weight, no copy
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {w.dtype}")
    if w.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {w.layout}")
    if w.is_meta:
        raise ValueError(f"{name} is a meta tensor (it has no data)")
    if w.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(w.shape)})")
    w = w.detach()
    if w.dim() == 0:
        w = w.reshape(1, 1)
    if not -w.dim() <= ch_axis < w.dim():
        raise ValueError(f"ch_axis={ch_axis} is out of range for {name} with {w.dim()} dims")
    if ch_axis % w.dim() != 0:
        w = w.movedim(ch_axis, 0)
    w = w.to(device="cpu", dtype=torch.float32)
    return w.reshape(w.shape[0], -1).contiguous()


def restore_shape(m: Tensor, like: Tensor, ch_axis: int) -> Tensor:
    """Inverse of :func:`as_matrix`: ``m [C, K]`` back to the shape and channel axis of ``like``."""
    if like.dim() == 0:
        return m.reshape(())
    if ch_axis % like.dim() == 0:
        return m.reshape(like.shape)
    moved = like.movedim(ch_axis, 0).shape
    return m.reshape(moved).movedim(0, ch_axis)


def check_qparams(scale: Tensor, zero_point: Tensor, channels: int, qmax: int) -> Tuple[Tensor, Tensor]:
    """Validated float32 scales and int32 zero points (zero points in ``[0, qmax]``)."""
    scale = torch.as_tensor(scale).detach().to(device="cpu", dtype=torch.float32).reshape(-1).contiguous()
    zero_point = torch.as_tensor(zero_point).detach().to(device="cpu").reshape(-1)
    if scale.numel() not in (1, channels) or zero_point.numel() != scale.numel():
        raise ValueError(
            f"scale and zero_point must hold 1 or {channels} values each, "
            f"got {scale.numel()} and {zero_point.numel()}"
        )
    if not torch.isfinite(scale).all() or (scale < FLT_MIN).any():
        raise ValueError(f"scale must be finite and >= {FLT_MIN} (the smallest normal float32)")
    # Checked before the int32 cast, which would wrap 2**40 to 0 or truncate 2.7 to 2.
    if zero_point.dtype == torch.bool or zero_point.is_complex():
        raise TypeError(f"zero_point must hold integers, got dtype {zero_point.dtype}")
    if zero_point.is_floating_point():
        if not torch.isfinite(zero_point).all() or (zero_point != torch.round(zero_point)).any():
            raise ValueError("zero_point must hold integer values")
        zero_point = zero_point.double()
    else:
        zero_point = zero_point.to(torch.int64)
    if (zero_point < 0).any() or (zero_point > qmax).any():
        raise ValueError(f"zero_point must lie in [0, {qmax}], got values in "
                         f"[{zero_point.min().item():g}, {zero_point.max().item():g}]")
    return scale, zero_point.to(torch.int32).contiguous()


def widen_into(t: Tensor, out: Tensor, backend: str, num_threads: int) -> Tensor:
    """The float32 values of a contiguous bfloat16/float16 CPU tensor ``t``, written into the float32 buffer ``out``
    (at least ``t.numel()`` elements) and returned as a view of ``t``'s shape.

    Natively the conversion runs in the core's own threads (a second thread pool
    spinning beside the native kernels costs them speed on a busy machine); the
    reference is ``out.copy_(t)``. Both are exact.
    """
    if t.dtype not in (torch.bfloat16, torch.float16) or not t.is_contiguous() or t.device.type != "cpu":
        raise TypeError(f"widen_into takes a contiguous bfloat16/float16 CPU tensor, got {t.dtype} on {t.device}")
    if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() < t.numel():
        raise ValueError(f"out must be a contiguous float32 buffer of at least {t.numel()} elements")
    view = out.reshape(-1)[: t.numel()].view(t.shape)
    if backend == "native":
        bits = t.view(torch.int16).numpy().view(np.uint16)
        kind = "bfloat16" if t.dtype == torch.bfloat16 else "float16"
        native().widen_16(bits.reshape(-1), kind, out.reshape(-1).numpy(), num_threads)
    else:
        view.copy_(t)
    return view


def group_count(k: int, group_size: int) -> int:
    """Groups per row of ``k`` weights: ``ceil(k / group_size)`` (the last one possibly short)."""
    return -(-int(k) // int(group_size))


def check_group_qparams(scale: Tensor, zero_point: Tensor, channels: int, groups: int,
                        qmax: int) -> Tuple[Tensor, Tensor]:
    """Validated group parameters: ``channels * groups`` values each (any shape), flattened in (row, group) order."""
    n = channels * groups
    if torch.as_tensor(scale).numel() != n or torch.as_tensor(zero_point).numel() != n:
        raise ValueError(f"group-wise scale and zero_point must hold {channels} x {groups} = {n} values each "
                         f"(channels x groups), got {torch.as_tensor(scale).numel()} and "
                         f"{torch.as_tensor(zero_point).numel()}")
    scale = torch.as_tensor(scale).reshape(-1)
    zero_point = torch.as_tensor(zero_point).reshape(-1)
    return check_qparams(scale, zero_point, n, qmax)


def finite_group_minmax(m: Tensor, group_size: int, name: str, backend: str,
                        num_threads: int) -> Tuple[Tensor, Tensor]:
    """Per-group min/max ``[C * G]`` of a matrix; ValueError naming ``name`` when it holds NaN or Inf."""
    if backend == "native":
        lo, hi, bad = native().group_minmax(m.numpy(), group_size, num_threads)
        lo, hi = torch.from_numpy(lo), torch.from_numpy(hi)
    else:
        lo, hi, bad = reference.group_minmax(m, group_size)
    if bad:
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or Inf)")
    return lo, hi


def finite_minmax(m: Tensor, name: str, backend: str, num_threads: int) -> Tuple[Tensor, Tensor]:
    """Per-row min/max of a matrix; ValueError naming ``name`` when it holds NaN or Inf."""
    if backend == "native":
        lo, hi, bad = native().channel_minmax(m.numpy(), num_threads)
        lo, hi = torch.from_numpy(lo), torch.from_numpy(hi)
    else:
        lo, hi, bad = reference.channel_minmax(m)
    if bad:
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or Inf)")
    return lo, hi
