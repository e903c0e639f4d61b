"""Quantization ranges: scales and zero points from min/max, or from the clipping-range search."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import numpy as np
import torch

from . import reference
from .backend import native, resolve_backend, resolve_threads
from .limits import DEFAULT_CANDIDATES, DEFAULT_N_GRID, DEFAULT_P, DEFAULT_STEP
from .spec import QuantizerSpec
from .tensors import as_matrix, check_bit_list, check_bits, finite_minmax

Tensor = torch.Tensor

__all__ = ["ClipSearchResult", "clip_search", "choose_qparams", "spec_qparams", "grid_ranges"]


@dataclass(frozen=True)
class ClipSearchResult:
    """Outcome of the clipping-range search, one row per bit-width, one column per group."""

    bits: np.ndarray        #: [B] int64 bit-widths
    best_index: Tensor      #: [B, S] int32 index i of the chosen ratio 1 - i*step
    scale: Tensor           #: [B, S] float32
    zero_point: Tensor      #: [B, S] int32
    lp_err: Tensor          #: [B, S] float64 sum |e|^p at the chosen range
    ratio: Tensor           #: [B, S] float64 chosen shrink ratio 1 - i*step


def _group_range(lo: Tensor, hi: Tensor, per_channel: bool) -> Tuple[Tensor, Tensor]:
    return (lo, hi) if per_channel else (lo.amin().reshape(1), hi.amax().reshape(1))


def _search(m: Tensor, lo: Tensor, hi: Tensor, bits: List[int], spec: QuantizerSpec, be: str, nt: int):
    """Native or reference clipping search over the groups of ``spec``: ``(index, scale, zp, lp) [B, S]``."""
    lo, hi = _group_range(lo, hi, spec.per_channel)
    if be == "native":
        out = native().clip_search(m.numpy(), lo.numpy(), hi.numpy(), np.asarray(bits, dtype=np.int32),
                                   spec.symmetric, spec.n_grid, spec.step, spec.p, nt)
        return tuple(torch.from_numpy(a) for a in out)
    return reference.clip_search(m, lo, hi, bits, spec.symmetric, spec.n_grid, spec.step, spec.p)


def grid_ranges(m: Tensor, lo: Tensor, hi: Tensor, bits: List[int], spec: QuantizerSpec, be: str,
                nt: int) -> Tuple[Tensor, Tensor]:
    """``[B, S]`` scales and zero points of matrix ``m`` (row ranges ``lo``/``hi``) under ``spec``."""
    if spec.clip == "mse":
        _, scale, zp, _ = _search(m, lo, hi, bits, spec, be, nt)
        return scale, zp
    lo, hi = _group_range(lo, hi, spec.per_channel)
    scale = torch.empty(len(bits), lo.numel(), dtype=torch.float32)
    zp = torch.empty(len(bits), lo.numel(), dtype=torch.int32)
    for i, b in enumerate(bits):
        if be == "native":
            s, z = native().qparams(lo.numpy(), hi.numpy(), b, spec.symmetric)
            scale[i], zp[i] = torch.from_numpy(s), torch.from_numpy(z)
        else:
            scale[i], zp[i] = reference.qparams(lo, hi, b, spec.symmetric)
    return scale, zp


def spec_qparams(w: Tensor, bits: int, spec: QuantizerSpec, *, ch_axis: int = 0, backend: Optional[str] = None,
                 num_threads: Optional[int] = None, name: str = "tensor") -> Tuple[Tensor, Tensor]:
    """Scale and zero point of ``w`` at ``bits`` under ``spec`` (what :func:`choose_qparams` computes)."""
    bits = check_bits(bits)
    be, nt = resolve_backend(backend), resolve_threads(num_threads)
    m = as_matrix(w, ch_axis, name)
    lo, hi = finite_minmax(m, name, be, nt)
    scale, zp = grid_ranges(m, lo, hi, [bits], spec, be, nt)
    return scale[0], zp[0]


def choose_qparams(
    w: Tensor,
    bits: int,
    *,
    per_channel: bool = True,
    symmetric: bool = False,
    clip: str = "minmax",
    p: float = DEFAULT_P,
    n_grid: int = DEFAULT_N_GRID,
    step: float = DEFAULT_STEP,
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
    spec = QuantizerSpec(per_channel, symmetric, clip, p, n_grid, step)
    return spec_qparams(w, bits, spec, ch_axis=ch_axis, backend=backend, num_threads=num_threads, name=name)


def clip_search(
    w: Tensor,
    bits: Iterable[int] = DEFAULT_CANDIDATES,
    *,
    per_channel: bool = True,
    symmetric: bool = False,
    clip: str = "mse",
    p: float = DEFAULT_P,
    n_grid: int = DEFAULT_N_GRID,
    step: float = DEFAULT_STEP,
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
    spec = QuantizerSpec(per_channel, symmetric, clip, p, n_grid, step)
    bit_list = check_bit_list(bits)
    be, nt = resolve_backend(backend), resolve_threads(num_threads)
    m = as_matrix(w, ch_axis, name)
    lo, hi = finite_minmax(m, name, be, nt)
    idx, scale, zp, err = _search(m, lo, hi, bit_list, spec, be, nt)
    ratio = 1.0 - idx.double() * spec.step
    return ClipSearchResult(np.asarray(bit_list, dtype=np.int64), idx, scale, zp, err, ratio)
