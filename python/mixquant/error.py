"""Roundoff error of a tensor at every candidate bit-width, and the clipping-range search."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional

import numpy as np
import torch

from . import reference
from ._backend import native, resolve_backend, resolve_threads
from .kernels import MAX_BITS, as_matrix, check_bits, check_finite_minmax

Tensor = torch.Tensor
CLIP_METHODS = ("minmax", "mse")

__all__ = ["RoundoffError", "ClipSearchResult", "roundoff_error", "clip_search", "check_bit_list"]


def check_bit_list(bits: Iterable[int], name: str = "bits") -> List[int]:
    """Validate a candidate set of bit-widths: non-empty, ints in 1..16; sorted, unique."""
    if type(bits) is range and bits.step > 0 and len(bits) and 1 <= bits.start and bits[-1] <= MAX_BITS:
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


@dataclass(frozen=True)
class ClipSearchResult:
    """Outcome of the clipping-range search, one row per bit-width, one column per group."""

    bits: np.ndarray        #: [B] int64 bit-widths
    best_index: Tensor      #: [B, S] int32 index i of the chosen ratio 1 - i*step
    scale: Tensor           #: [B, S] float32
    zero_point: Tensor      #: [B, S] int32
    lp_err: Tensor          #: [B, S] float64 sum |e|^p at the chosen range
    ratio: Tensor           #: [B, S] float64 chosen shrink ratio 1 - i*step


@dataclass(frozen=True)
class RoundoffError:
    """Quantize→dequantize roundoff error of one tensor, one entry per bit-width.

    ``sse`` is ``sum((w - w_hat)**2)``, ``mse`` is ``sse / numel``, ``norm`` is
    ``sse / sum(w**2)`` (1/SQNR; 0 for an all-zero tensor), ``max_abs`` is
    ``max |w - w_hat|``. ``scale``/``zero_point`` have one row per bit-width and one
    column per channel (one column per tensor).
    """

    bits: np.ndarray
    sse: np.ndarray
    mse: np.ndarray
    norm: np.ndarray
    max_abs: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    channel_sse: np.ndarray
    channel_max_abs: np.ndarray
    numel: int
    energy: float
    per_channel: bool
    symmetric: bool
    clip: str

    def at(self, bits: int) -> dict:
        """The error figures at one bit-width as a dict."""
        idx = int(np.searchsorted(self.bits, bits))
        if idx >= len(self.bits) or self.bits[idx] != bits:
            raise KeyError(f"bit-width {bits} is not in this table {self.bits.tolist()}")
        return {k: float(getattr(self, k)[idx]) for k in ("sse", "mse", "norm", "max_abs")}


def _check_clip_args(clip: str, p: float, n_grid: int, step: float) -> None:
    if clip not in CLIP_METHODS:
        raise ValueError(f"clip must be one of {CLIP_METHODS}, got {clip!r}")
    if not isinstance(n_grid, (int, np.integer)) or isinstance(n_grid, bool) or n_grid < 1:
        raise ValueError(f"n_grid must be a positive int, got {n_grid!r}")
    if not (isinstance(step, (int, float)) and step > 0 and (n_grid - 1) * step < 1):
        raise ValueError(f"step must be > 0 with (n_grid - 1) * step < 1, got step={step!r}, n_grid={n_grid}")
    if not (isinstance(p, (int, float)) and np.isfinite(p) and p > 0):
        raise ValueError(f"p must be a finite positive number, got {p!r}")


def _search_ranges(m: Tensor, lo: Tensor, hi: Tensor, bits: List[int], per_channel: bool, symmetric: bool,
                   n_grid: int, step: float, p: float, be: str, nt: int):
    if not per_channel:
        lo, hi = lo.amin().reshape(1), hi.amax().reshape(1)
    if be == "native":
        out = native().clip_search(m.numpy(), lo.numpy(), hi.numpy(), np.asarray(bits, dtype=np.int32),
                                   bool(symmetric), int(n_grid), float(step), float(p), nt)
        return tuple(torch.from_numpy(a) for a in out)
    return reference.clip_search(m, lo, hi, bits, bool(symmetric), int(n_grid), float(step), float(p))


def _ranges(m: Tensor, lo: Tensor, hi: Tensor, bit_list: List[int], per_channel: bool, symmetric: bool,
            clip: str, n_grid: int, step: float, p: float, be: str, nt: int):
    """``[B, S]`` scales and zero points: of the min/max range, or of the clipping search."""
    if clip == "mse":
        _, scale, zp, _ = _search_ranges(m, lo, hi, bit_list, per_channel, symmetric, n_grid, step, p, be, nt)
        return scale, zp
    if not per_channel:
        lo, hi = lo.amin().reshape(1), hi.amax().reshape(1)
    scale = torch.empty(len(bit_list), lo.numel(), dtype=torch.float32)
    zp = torch.empty(len(bit_list), lo.numel(), dtype=torch.int32)
    for i, b in enumerate(bit_list):
        if be == "native":
            s, z = native().qparams(lo.numpy(), hi.numpy(), b, bool(symmetric))
            scale[i], zp[i] = torch.from_numpy(s), torch.from_numpy(z)
        else:
            scale[i], zp[i] = reference.qparams(lo, hi, b, bool(symmetric))
    return scale, zp


def clip_search(
    w: Tensor,
    bits: Iterable[int] = range(2, 9),
    *,
    per_channel: bool = True,
    symmetric: bool = False,
    clip: str = "mse",
    p: float = 2.0,
    n_grid: int = 80,
    step: float = 0.01,
    ch_axis: int = 0,
    backend: Optional[str] = None,
    num_threads: Optional[int] = None,
    name: str = "tensor",
) -> ClipSearchResult:
    """Search, per bit-width and channel (or tensor), the clipping range with the lowest Lp error.

    Candidate ``i`` (0 ≤ i < n_grid) uses ``(lo*(1-i*step), hi*(1-i*step))`` of the
    zero-including min/max range; ties keep the widest range. One fused pass in
    the native core serves all candidates and all bit-widths.
    """
    _check_clip_args(clip, p, n_grid, step)
    bit_list = check_bit_list(bits)
    be, nt = resolve_backend(backend), resolve_threads(num_threads)
    m = as_matrix(w, ch_axis, name)
    lo, hi = check_finite_minmax(m, name, be, nt)
    idx, scale, zp, err = _search_ranges(m, lo, hi, bit_list, per_channel, symmetric, n_grid, step, p, be, nt)
    ratio = 1.0 - idx.double() * step
    return ClipSearchResult(np.asarray(bit_list, dtype=np.int64), idx, scale, zp, err, ratio)


def roundoff_error(
    tensor: Tensor,
    bits: Iterable[int] = range(2, 9),
    *,
    per_channel: bool = False,
    symmetric: bool = False,
    clip: str = "minmax",
    p: float = 2.0,
    n_grid: int = 80,
    step: float = 0.01,
    ch_axis: int = 0,
    backend: Optional[str] = None,
    num_threads: Optional[int] = None,
    name: str = "tensor",
) -> RoundoffError:
    """Roundoff error of ``tensor`` for every candidate bit-width in one pass.

    ``clip="minmax"`` quantizes over the zero-including min/max range;
    ``clip="mse"`` first runs :func:`clip_search` (Lp error with exponent ``p``)
    and measures the error at the chosen range. Raises ValueError (naming
    ``name``) for NaN/Inf, empty tensors and bad bit-widths, TypeError for
    non-float tensors.
    """
    _check_clip_args(clip, p, n_grid, step)
    bit_list = check_bit_list(bits)
    be, nt = resolve_backend(backend), resolve_threads(num_threads)
    m = as_matrix(tensor, ch_axis, name)
    if be == "native" and clip == "minmax":
        # One native call: min/max, parameters, table and energy, one pass per channel.
        lo, hi, scale, zp, sse, max_abs, row_energy, n_bad = native().minmax_error_table(
            m.numpy(), bit_list, bool(per_channel), bool(symmetric), nt)
        if n_bad:
            raise ValueError(f"{name} contains {n_bad} non-finite value(s) (NaN or Inf)")
        energy = float(row_energy.sum())
    else:
        lo, hi = check_finite_minmax(m, name, be, nt)
        scale, zp = _ranges(m, lo, hi, bit_list, per_channel, symmetric, clip, n_grid, step, p, be, nt)
        if be == "native":
            sse, max_abs = native().error_table(m.numpy(), scale.numpy(), zp.numpy(),
                                                np.asarray(bit_list, np.int32), nt)
            energy = float(native().row_energy(m.numpy(), lo.numpy(), hi.numpy(), nt).sum())
        else:  # [B, 1] parameters broadcast over all rows in the reference
            sse, max_abs = (t.numpy() for t in reference.error_table(m, scale, zp, bit_list))
            energy = float(m.double().square().sum())
        lo, hi, scale, zp = lo.numpy(), hi.numpy(), scale.numpy(), zp.numpy()
    # sse >= 0 in double cannot overflow when summed, and max |e| = inf implies sse = inf:
    # the per-bit totals are finite exactly when the whole table is.
    total = sse.sum(axis=1)
    if not np.isfinite(total).all():
        bad = [b for b, t in zip(bit_list, total) if not np.isfinite(t)]
        amax = float(max(np.abs(lo).max(), np.abs(hi).max()))
        raise ValueError(f"{name}: the roundoff error at {bad} bits is not finite: values up to {amax:.4g} "
                         "are too close to the float32 limit for the quantization grid (a grid point "
                         "overflows float32); rescale the tensor")
    numel = m.numel()
    return RoundoffError(
        bits=np.asarray(bit_list, dtype=np.int64),
        sse=total,
        mse=total / numel,
        norm=total / energy if energy > 0 else np.zeros_like(total),
        max_abs=max_abs.max(axis=1).astype(np.float64),
        scale=scale,
        zero_point=zp,
        channel_sse=sse,
        channel_max_abs=max_abs,
        numel=numel,
        energy=energy,
        per_channel=bool(per_channel),
        symmetric=bool(symmetric),
        clip=clip,
    )
