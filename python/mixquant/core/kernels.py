"""Tensor kernels: fake quantization, integer codes, dequantization, bit packing, unpack-and-dequantize,
the packed matrix-vector product.

Every function takes torch tensors (CPU or not, any float dtype, contiguous or
not) and a ``backend`` argument (``"native"``, ``"reference"`` or ``None`` for
the default). The native path hands float32 buffers to the C++ core without a
copy when the tensor already is a contiguous float32 CPU tensor. Choosing
scales and zero points is :mod:`mixquant.core.ranges`' job.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

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
    "unpack_dequantize",
    "packed_matvec",
    "MATVEC_TOLERANCE",
    "PackedLayout",
    "packed_layout",
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


class PackedLayout(NamedTuple):
    """How the flat codes of a weight map to its scales: ``[outer, channels, inner]``, blocks along ``inner``.

    Element ``(a, c, r)`` (flat index ``(a * channels + c) * inner + r``) uses
    parameter ``c * groups + r // block``, ``groups = max(1, ceil(inner / block))``.
    """

    outer: int
    channels: int
    inner: int
    block: int

    @property
    def numel(self) -> int:
        return self.outer * self.channels * self.inner

    @property
    def groups(self) -> int:
        """Parameter sets per channel."""
        return max(1, -(-self.inner // self.block))


def packed_layout(shape: Sequence[int], ch_axis: int, num_params: int, block_size: Optional[int] = None) -> PackedLayout:
    """The layout of a weight of ``shape`` with ``num_params`` scales.

    One parameter: per tensor. ``shape[ch_axis]`` parameters: per channel
    along ``ch_axis``. With ``block_size``: ``ceil(inner / block_size)``
    parameters per channel, blocks running along the contiguous extent after
    ``ch_axis`` (for ``ch_axis = 0`` the row of the ``[C, K]`` matrix).
    """
    shape = tuple(int(d) for d in shape)
    if not shape or any(d < 0 for d in shape):
        raise ValueError(f"shape must be a non-empty tuple of sizes >= 0, got {shape}")
    if isinstance(ch_axis, bool) or not isinstance(ch_axis, int) or not -len(shape) <= ch_axis < len(shape):
        raise ValueError(f"ch_axis={ch_axis!r} is out of range for shape {shape}")
    ch_axis %= len(shape)
    n = math.prod(shape)
    if block_size is None and num_params == 1:
        return PackedLayout(1, 1, n, max(n, 1))
    outer, channels, inner = math.prod(shape[:ch_axis]), shape[ch_axis], math.prod(shape[ch_axis + 1:])
    if block_size is None:
        if num_params != channels:
            raise ValueError(f"{num_params} scales fit neither per tensor (1) nor per channel "
                             f"({channels} along axis {ch_axis}) for shape {shape}")
        return PackedLayout(outer, channels, inner, max(inner, 1))
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size <= max(inner, 1):
        raise ValueError(f"block_size must be an int in 1..{max(inner, 1)}, got {block_size!r}")
    layout = PackedLayout(outer, channels, inner, block_size)
    if num_params != channels * layout.groups:
        raise ValueError(f"blocks of {block_size} need {channels * layout.groups} scales for shape {shape} "
                         f"along axis {ch_axis}, got {num_params}")
    return layout


def _packed_bytes(packed: Union[Tensor, np.ndarray, bytes]) -> Tensor:
    if isinstance(packed, (bytes, bytearray, memoryview)):
        packed = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
    elif isinstance(packed, np.ndarray):
        packed = torch.from_numpy(packed)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8 bytes, got {getattr(packed, 'dtype', type(packed).__name__)}")
    return packed.reshape(-1)


def unpack_dequantize(
    packed: Union[Tensor, np.ndarray, bytes], bits: int, shape: Sequence[int], scale: Tensor, zero_point: Tensor,
    *, ch_axis: int = 0, block_size: Optional[int] = None, out: Optional[Tensor] = None,
    backend: Optional[str] = None, num_threads: Optional[int] = None,
) -> Tensor:
    """Float32 weight of ``shape`` from codes packed by :func:`pack_bits`: ``(code - zero_point) * scale``.

    The codes are the weight's elements in memory order, ``bits`` each,
    LSB-first. ``scale``/``zero_point`` hold one value (per tensor),
    ``shape[ch_axis]`` values (per channel) or, with ``block_size``, that many
    times ``ceil(inner / block_size)`` (blocked; see :func:`packed_layout`).
    The result equals unpacking and then :func:`dequantize_tensor` bit for bit,
    in one pass (natively: SIMD unpacking into an L1 buffer, then the dequantize
    kernel). ``out`` (a contiguous float32 CPU tensor of ``numel`` elements)
    receives the values in place. A CUDA ``packed`` is decoded on its device by
    the reference path.
    """
    bits = check_bits(bits)
    buf = _packed_bytes(packed)
    scale_t = torch.as_tensor(scale)
    layout = packed_layout(shape, ch_axis, scale_t.numel(), block_size)
    n = layout.numel
    if buf.numel() < (n * bits + 7) // 8:
        raise ValueError(f"packed holds {buf.numel()} bytes, {n} codes of {bits} bits need {(n * bits + 7) // 8}")
    s, z = check_qparams(scale_t, zero_point, scale_t.numel(), 2**bits - 1)
    if out is not None and (not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.device.type != "cpu"
                            or not out.is_contiguous() or out.numel() != n):
        raise ValueError(f"out must be a contiguous float32 CPU tensor of {n} elements")
    dst = decode_packed(buf, bits, layout, s, z, out=out, backend=backend, num_threads=num_threads)
    return dst.view(tuple(int(d) for d in shape))


def decode_packed(
    packed: Tensor, bits: int, layout: PackedLayout, scale: Tensor, zero_point: Tensor, *,
    out: Optional[Tensor] = None, backend: Optional[str] = None, num_threads: Optional[int] = None,
) -> Tensor:
    """:func:`unpack_dequantize` without the Python-side checks, for arguments validated once (flat result).

    The packed-weight runtime calls it on every forward. The native binding still
    checks sizes, ranges and scales itself, so bad arguments raise ValueError
    rather than touch memory they should not; the reference path trusts them.
    """
    if resolve_backend(backend) == "native" and packed.device.type == "cpu":
        dst = torch.empty(layout.numel, dtype=torch.float32) if out is None else out
        native().unpack_dequantize(packed.contiguous().numpy(), bits, *layout, scale.contiguous().numpy(),
                                   zero_point.contiguous().numpy(), resolve_threads(num_threads), dst.numpy())
        return dst
    values = reference.unpack_dequantize(packed, bits, *layout, scale, zero_point)
    return values if out is None else out.copy_(values.reshape(out.shape))


# The bound packed_matvec's native result is held to against its float64 twin
# (see packed_matvec): |y - y64| <= MATVEC_TOLERANCE[0] * sum_k scale * (code + zp) * |x|
#                                   + MATVEC_TOLERANCE[1] * |y64|.
MATVEC_TOLERANCE = (2.0**-18, 2.0**-23)


def packed_matvec(
    packed: Union[Tensor, np.ndarray, bytes], bits: int, shape: Sequence[int], scale: Tensor, zero_point: Tensor,
    x: Tensor, *, block_size: Optional[int] = None, out: Optional[Tensor] = None, backend: Optional[str] = None,
    num_threads: Optional[int] = None,
) -> Tensor:
    """``x @ W.T`` for the ``[C, K]`` weight ``W`` of codes packed by :func:`pack_bits`, without forming ``W``.

    ``W[c, k] = (code[c, k] - zero_point[i]) * scale[i]`` with the parameters of
    :func:`unpack_dequantize` (one: per tensor; ``C``: per channel; with
    ``block_size``, ``C * ceil(K / block_size)`` blocks along each row). ``x`` is a
    contiguous float32 CPU tensor ``[K]`` (result ``[C]``) or ``[N, K]`` (result
    ``[N, C]``; made for a few rows, the batch-1 decoding case); ``out``, a
    contiguous float32 CPU tensor of ``N * C`` elements, receives the result in place.

    Natively each packed byte is read once: codes are decoded in registers and
    multiplied into float32 partial sums, every block computed as
    ``scale * (sum_k code * x - zero_point * sum_k x)``. Each float32 partial sum
    takes at most 64 terms before it is added into a double; the scale, the
    zero-point term and the sum over blocks are double; the result is rounded
    to float32 once. Against the float64 reference (``backend="reference"``, the
    same form in float64) the result is therefore within
    ``2**-18 * sum_k scale * (code + zero_point) * |x| + 2**-23 * |y|`` (``MATVEC_TOLERANCE``; the
    zero-point part covers the double sums, whose error is far smaller), not
    bit-identical: its float32 partial sums add in another order. Against
    dequantize-then-matmul (``x @ unpack_dequantize(...).T``, what an unpacked
    model computes) it differs further by that product's own rounding: each
    weight rounded to float32, then float32 sums in BLAS's order. The
    zero-point form carries the rounding of ``sum code * x``, which is larger
    than ``sum (code - zp) * x`` when codes sit far from their zero point.
    A non-finite ``x`` gives non-finite outputs (``inf - inf`` is NaN where
    dequantize-then-matmul may give an infinity).
    """
    bits = check_bits(bits)
    buf = _packed_bytes(packed)
    shape = tuple(int(d) for d in shape) if isinstance(shape, (tuple, list, torch.Size)) else shape
    if not isinstance(shape, tuple) or len(shape) != 2 or any(d < 0 for d in shape):
        raise ValueError(f"shape must be (C, K), two sizes >= 0, got {shape!r}")
    rows, cols = shape
    scale_t = torch.as_tensor(scale)
    if scale_t.numel() == 1 and block_size is None:
        block = max(cols, 1)
    else:
        block = packed_layout(shape, 0, scale_t.numel(), block_size).block
    if buf.numel() < (rows * cols * bits + 7) // 8:
        raise ValueError(f"packed holds {buf.numel()} bytes, {rows * cols} codes of {bits} bits need "
                         f"{(rows * cols * bits + 7) // 8}")
    s, z = check_qparams(scale_t, zero_point, scale_t.numel(), 2**bits - 1)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(f"x must be float32, got {x.dtype}")
    if x.dim() not in (1, 2) or x.shape[-1] != cols:
        raise ValueError(f"x must be [K] or [N, K] with K = {cols}, got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (call .contiguous() on it)")
    n = 1 if x.dim() == 1 else x.shape[0]
    if out is not None and (not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.device.type != "cpu"
                            or not out.is_contiguous() or out.numel() != n * rows):
        raise ValueError(f"out must be a contiguous float32 CPU tensor of N * C = {n * rows} elements")
    y = matvec_packed(buf, bits, rows, cols, block, s, z, x.reshape(n, cols), out=out, backend=backend,
                      num_threads=num_threads)
    return y.view(rows) if x.dim() == 1 else y.view(n, rows)


def matvec_packed(
    packed: Tensor, bits: int, rows: int, cols: int, block: int, scale: Tensor, zero_point: Tensor, x: Tensor, *,
    out: Optional[Tensor] = None, backend: Optional[str] = None, num_threads: Optional[int] = None,
) -> Tensor:
    """:func:`packed_matvec` without the Python-side checks (``x`` is ``[N, cols]``; flat ``[N * rows]`` result).

    The packed runtime calls it in the forward of a one-row Linear. The native
    binding still checks sizes, ranges, scales and strides itself; the
    reference path (also taken for tensors that are not on the CPU) trusts them.
    """
    if resolve_backend(backend) == "native" and packed.device.type == "cpu" and x.device.type == "cpu":
        dst = torch.empty(x.shape[0] * rows, dtype=torch.float32) if out is None else out
        native().packed_matvec(packed.contiguous().numpy(), bits, rows, cols, block, scale.contiguous().numpy(),
                               zero_point.contiguous().numpy(), x.detach().numpy(), resolve_threads(num_threads),
                               dst.numpy())
        return dst
    y = reference.packed_matvec(packed, bits, rows, cols, block, scale, zero_point, x).reshape(-1)
    return y if out is None else out.copy_(y)
