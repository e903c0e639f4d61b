"""Tensor kernels: fake quantization, integer codes, dequantization, bit packing.

Every function takes torch tensors (CPU or not, any float dtype, contiguous or
not) and a ``backend`` argument (``"native"``, ``"reference"`` or ``None`` for
the default). The native path hands float32 buffers to the C++ core without a
copy when the tensor already is a contiguous float32 CPU tensor. Choosing
scales and zero points is :mod:`mixquant.core.ranges`' job.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from . import reference
from .backend import native, resolve_backend, resolve_threads
from .limits import MAX_BITS
from .spec import check_group_size
from .tensors import (as_matrix, check_bits, check_group_qparams, check_qparams, finite_minmax, group_count,
                      restore_shape)

Tensor = torch.Tensor

__all__ = [
    "fake_quantize_tensor",
    "quantize_tensor",
    "dequantize_tensor",
    "pack_bits",
    "unpack_bits",
]


def _codes(
    w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, ch_axis: int, group_size: Optional[int],
    backend: Optional[str], num_threads: Optional[int], fake: bool,
) -> Tensor:
    bits = check_bits(bits)
    gs = check_group_size(group_size)
    be = resolve_backend(backend)
    nt = resolve_threads(num_threads)
    m = as_matrix(w, ch_axis, "w")
    if gs is None:
        scale, zero_point = check_qparams(scale, zero_point, m.shape[0], 2**bits - 1)
    else:
        scale, zero_point = check_group_qparams(scale, zero_point, m.shape[0], group_count(m.shape[1], gs),
                                                2**bits - 1)
    # NaN/Inf policy: refuse (a code or a fake-quantized value of NaN would be silently finite).
    finite_minmax(m, "w", be, nt)
    if be == "native":
        if gs is None:
            fn = native().fake_quantize if fake else native().quantize
            out = fn(m.numpy(), scale.numpy(), zero_point.numpy(), bits, nt)
        else:
            fn = native().group_fake_quantize if fake else native().group_quantize
            out = fn(m.numpy(), scale.numpy(), zero_point.numpy(), bits, gs, nt)
        out = torch.from_numpy(out.astype(np.int32) if out.dtype == np.uint16 else out)
    elif gs is None:
        fn = reference.fake_quantize if fake else reference.quantize
        out = fn(m, scale, zero_point, bits)
    else:
        fn = reference.group_fake_quantize if fake else reference.group_quantize
        out = fn(m, scale, zero_point, bits, gs)
    return restore_shape(out, w, ch_axis)


def fake_quantize_tensor(
    w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, *, ch_axis: int = 0,
    group_size: Optional[int] = None, backend: Optional[str] = None, num_threads: Optional[int] = None,
) -> Tensor:
    """Quantize and dequantize ``w`` (float32 result, same shape).

    Formula (torch.fake_quantize's): ``(clamp(round(w * (1/scale)) + zp, 0, 2**bits-1) - zp) * scale``
    with round-half-to-even. NaN or Inf in ``w`` raises ValueError (nothing is
    propagated or saturated silently); so do scales below the smallest normal
    float32 and zero points outside ``[0, 2**bits - 1]``. Parameters are ``[C]``
    or ``[1]``, or, with ``group_size``, one per group: ``[C, G]`` (any shape with
    ``C * G`` values in (row, group) order, as :func:`choose_qparams` returns them).
    """
    return _codes(w, scale, zero_point, bits, ch_axis, group_size, backend, num_threads, fake=True)


def quantize_tensor(
    w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, *, ch_axis: int = 0,
    group_size: Optional[int] = None, backend: Optional[str] = None, num_threads: Optional[int] = None,
) -> Tensor:
    """Integer codes of ``w`` in ``[0, 2**bits - 1]`` (uint8 for bits <= 8, else int32).

    NaN or Inf in ``w`` raises ValueError, as in :func:`fake_quantize_tensor`;
    parameters as there.
    """
    return _codes(w, scale, zero_point, bits, ch_axis, group_size, backend, num_threads, fake=False)


def dequantize_tensor(
    codes: Tensor, scale: Tensor, zero_point: Tensor, *, ch_axis: int = 0, group_size: Optional[int] = None,
    backend: Optional[str] = None, num_threads: Optional[int] = None,
) -> Tensor:
    """Float32 values ``(codes - zero_point) * scale`` of integer codes (parameters as in :func:`quantize_tensor`)."""
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex():
        raise TypeError("codes must be an integer torch.Tensor")
    if codes.numel() == 0:
        raise ValueError("codes is empty")
    gs = check_group_size(group_size)
    be = resolve_backend(backend)
    moved = codes.movedim(ch_axis, 0) if codes.dim() and ch_axis % codes.dim() else codes
    m = moved.reshape(moved.shape[0] if moved.dim() else 1, -1)
    if gs is None:
        scale, zero_point = check_qparams(scale, zero_point, m.shape[0], 2**MAX_BITS - 1)
    else:
        scale, zero_point = check_group_qparams(scale, zero_point, m.shape[0], group_count(m.shape[1], gs),
                                                2**MAX_BITS - 1)
    if m.min() < 0 or m.max() > 2**MAX_BITS - 1:
        raise ValueError(f"codes must lie in [0, {2**MAX_BITS - 1}]")
    if be == "native":
        # The core checks zero points against 2**bits - 1 too: 8 bits only if both fit.
        bits = 8 if m.max() < 256 and zero_point.max() < 256 else MAX_BITS
        raw = np.ascontiguousarray(m.to(torch.uint8).numpy() if bits == 8
                                   else m.to(torch.int32).numpy().astype(np.uint16))
        nt = resolve_threads(num_threads)
        if gs is None:
            out = native().dequantize(raw, scale.numpy(), zero_point.numpy(), bits, nt)
        else:
            out = native().group_dequantize(raw, scale.numpy(), zero_point.numpy(), bits, gs, nt)
        out = torch.from_numpy(out)
    elif gs is None:
        out = reference.dequantize(m, scale, zero_point)
    else:
        out = reference.group_dequantize(m, scale, zero_point, gs)
    return restore_shape(out, codes, ch_axis)


def _as_numpy_codes(codes: Union[Tensor, np.ndarray]) -> np.ndarray:
    arr = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"codes must hold integers, got dtype {arr.dtype}")
    arr = arr.reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() > 2**MAX_BITS - 1):
        raise ValueError(f"codes must lie in [0, {2**MAX_BITS - 1}]")
    return np.ascontiguousarray(arr, dtype=np.uint8 if arr.dtype.itemsize == 1 else np.uint16)


def pack_bits(codes: Union[Tensor, np.ndarray], bits: int, *, backend: Optional[str] = None) -> np.ndarray:
    """Pack integer codes (flattened) into ``ceil(n*bits/8)`` bytes, LSB-first."""
    bits = check_bits(bits)
    arr = _as_numpy_codes(codes)
    if resolve_backend(backend) == "native":
        return native().pack_bits(arr, bits)
    return reference.pack_bits(torch.from_numpy(arr.astype(np.int64)), bits).numpy()


def unpack_bits(packed: Union[Tensor, np.ndarray, bytes], bits: int, n: int, *, backend: Optional[str] = None) -> np.ndarray:
    """Unpack ``n`` codes of ``bits`` bits from an LSB-first byte stream."""
    bits = check_bits(bits)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if isinstance(packed, (bytes, bytearray, memoryview)):
        buf = np.frombuffer(packed, dtype=np.uint8)
    elif isinstance(packed, torch.Tensor):
        buf = packed.detach().cpu().numpy()
    else:
        buf = np.asarray(packed)
    if buf.dtype != np.uint8:
        raise TypeError(f"packed must be uint8 bytes, got dtype {buf.dtype}")
    buf = np.ascontiguousarray(buf.reshape(-1))
    if resolve_backend(backend) == "native":
        return native().unpack_bits(buf, bits, int(n))
    out = reference.unpack_bits(torch.from_numpy(buf), bits, int(n)).numpy()
    return out if bits <= 8 else out.astype(np.uint16)
