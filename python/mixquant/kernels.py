"""Tensor-level kernels: quantization parameters, fake quantization, codes, packing.

Every function takes torch tensors (CPU or not, any float dtype, contiguous or
not) and a ``backend`` argument (``"native"``, ``"reference"`` or ``None`` for
the global default). The native path hands float32 buffers to the C++ core
without a copy when the tensor already is a contiguous float32 CPU tensor.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import reference
from ._backend import native, resolve_backend, resolve_threads

Tensor = torch.Tensor
MAX_BITS = 16
FLT_MIN = float(torch.finfo(torch.float32).tiny)

__all__ = [
    "choose_qparams",
    "fake_quantize_tensor",
    "quantize_tensor",
    "dequantize_tensor",
    "pack_bits",
    "unpack_bits",
    "as_matrix",
    "check_bits",
]


def check_bits(bits: object, name: str = "bits") -> int:
    """Validate one bit-width (an int in 1..16) and return it."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"{name} must be an int in 1..{MAX_BITS}, got {type(bits).__name__}")
    if not 1 <= int(bits) <= MAX_BITS:
        raise ValueError(f"{name} must be in 1..{MAX_BITS}, got {bits}")
    return int(bits)


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


def _restore_shape(m: Tensor, like: Tensor, ch_axis: int) -> Tensor:
    if like.dim() == 0:
        return m.reshape(())
    if ch_axis % like.dim() == 0:
        return m.reshape(like.shape)
    moved = like.movedim(ch_axis, 0).shape
    return m.reshape(moved).movedim(0, ch_axis)


def _params(scale: Tensor, zero_point: Tensor, channels: int, qmax: int) -> Tuple[Tensor, Tensor]:
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


def check_finite_minmax(m: Tensor, name: str, backend: str, num_threads: int) -> Tuple[Tensor, Tensor]:
    """Per-row min/max of a matrix; ValueError naming ``name`` when it holds NaN or Inf."""
    if backend == "native":
        lo, hi, bad = native().channel_minmax(m.numpy(), num_threads)
        lo, hi = torch.from_numpy(lo), torch.from_numpy(hi)
    else:
        lo, hi, bad = reference.channel_minmax(m)
    if bad:
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or Inf)")
    return lo, hi


def choose_qparams(
    w: Tensor,
    bits: int,
    *,
    per_channel: bool = True,
    symmetric: bool = False,
    clip: str = "minmax",
    p: float = 2.0,
    n_grid: int = 80,
    step: float = 0.01,
    ch_axis: int = 0,
    backend: Optional[str] = None,
    num_threads: Optional[int] = None,
    name: str = "tensor",
) -> Tuple[Tensor, Tensor]:
    """Scale and zero point for quantizing ``w`` at ``bits``.

    ``clip="minmax"`` uses the full range; ``clip="mse"`` searches ``n_grid``
    shrink ratios ``1 - i*step`` and keeps the one with the lowest ``sum |e|^p``.
    Returns ``(scale float32, zero_point int32)`` of shape ``[C]`` (per channel)
    or ``[1]`` (per tensor).
    """
    from .error import clip_search  # local import: error.py builds on this module

    bits = check_bits(bits)
    if clip == "minmax":
        be = resolve_backend(backend)
        nt = resolve_threads(num_threads)
        m = as_matrix(w, ch_axis, name)
        lo, hi = check_finite_minmax(m, name, be, nt)
        if not per_channel:
            lo, hi = lo.amin().reshape(1), hi.amax().reshape(1)
        if be == "native":
            s, z = native().qparams(lo.numpy(), hi.numpy(), bits, bool(symmetric))
            return torch.from_numpy(s), torch.from_numpy(z)
        return reference.qparams(lo, hi, bits, bool(symmetric))
    result = clip_search(
        w, [bits], per_channel=per_channel, symmetric=symmetric, clip=clip, p=p, n_grid=n_grid,
        step=step, ch_axis=ch_axis, backend=backend, num_threads=num_threads, name=name,
    )
    return result.scale[0], result.zero_point[0]


def _codes(
    w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, ch_axis: int,
    backend: Optional[str], num_threads: Optional[int], fake: bool,
) -> Tensor:
    bits = check_bits(bits)
    be = resolve_backend(backend)
    nt = resolve_threads(num_threads)
    m = as_matrix(w, ch_axis, "w")
    scale, zero_point = _params(scale, zero_point, m.shape[0], 2**bits - 1)
    # NaN/Inf policy: refuse (a code or a fake-quantized value of NaN would be silently finite).
    check_finite_minmax(m, "w", be, nt)
    if be == "native":
        fn = native().fake_quantize if fake else native().quantize
        out = fn(m.numpy(), scale.numpy(), zero_point.numpy(), bits, nt)
        out = torch.from_numpy(out.astype(np.int32) if out.dtype == np.uint16 else out)
    else:
        fn = reference.fake_quantize if fake else reference.quantize
        out = fn(m, scale, zero_point, bits)
    return _restore_shape(out, w, ch_axis)


def fake_quantize_tensor(
    w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, *, ch_axis: int = 0,
    backend: Optional[str] = None, num_threads: Optional[int] = None,
) -> Tensor:
    """Quantize and dequantize ``w`` (float32 result, same shape).

    Formula (torch.fake_quantize's): ``(clamp(round(w * (1/scale)) + zp, 0, 2**bits-1) - zp) * scale``
    with round-half-to-even. NaN or Inf in ``w`` raises ValueError (nothing is
    propagated or saturated silently); so do scales below the smallest normal
    float32 and zero points outside ``[0, 2**bits - 1]``.
    """
    return _codes(w, scale, zero_point, bits, ch_axis, backend, num_threads, fake=True)


def quantize_tensor(
    w: Tensor, scale: Tensor, zero_point: Tensor, bits: int, *, ch_axis: int = 0,
    backend: Optional[str] = None, num_threads: Optional[int] = None,
) -> Tensor:
    """Integer codes of ``w`` in ``[0, 2**bits - 1]`` (uint8 for bits <= 8, else int32).

    NaN or Inf in ``w`` raises ValueError, as in :func:`fake_quantize_tensor`.
    """
    return _codes(w, scale, zero_point, bits, ch_axis, backend, num_threads, fake=False)


def dequantize_tensor(
    codes: Tensor, scale: Tensor, zero_point: Tensor, *, ch_axis: int = 0,
    backend: Optional[str] = None, num_threads: Optional[int] = None,
) -> Tensor:
    """Float32 values ``(codes - zero_point) * scale`` of integer codes."""
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex():
        raise TypeError("codes must be an integer torch.Tensor")
    if codes.numel() == 0:
        raise ValueError("codes is empty")
    be = resolve_backend(backend)
    moved = codes.movedim(ch_axis, 0) if codes.dim() and ch_axis % codes.dim() else codes
    m = moved.reshape(moved.shape[0] if moved.dim() else 1, -1)
    scale, zero_point = _params(scale, zero_point, m.shape[0], 2**MAX_BITS - 1)
    if m.min() < 0 or m.max() > 2**MAX_BITS - 1:
        raise ValueError(f"codes must lie in [0, {2**MAX_BITS - 1}]")
    if be == "native":
        # The core checks zero points against 2**bits - 1 too: 8 bits only if both fit.
        bits = 8 if m.max() < 256 and zero_point.max() < 256 else 16
        raw = m.to(torch.uint8).numpy() if bits == 8 else m.to(torch.int32).numpy().astype(np.uint16)
        out = torch.from_numpy(
            native().dequantize(np.ascontiguousarray(raw), scale.numpy(), zero_point.numpy(), bits,
                                resolve_threads(num_threads))
        )
    else:
        out = reference.dequantize(m, scale, zero_point)
    return _restore_shape(out, codes, ch_axis)


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
