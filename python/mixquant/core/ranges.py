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
from .tensors import as_matrix, check_bit_list, check_bits, finite_group_minmax, finite_minmax, group_count

Tensor = torch.Tensor

__all__ = ["ClipSearchResult", "clip_search", "choose_qparams", "spec_qparams", "spec_ranges", "grid_ranges"]


@dataclass(frozen=True)
class ClipSearchResult:
    """Outcome of the clipping-range search, one row per bit-width, one column per group.

    The groups are the tensor (one column), the output channels, or the
    (channel, group) pairs of a group-wise quantizer in row-major order.
    """

    bits: np.ndarray        #: [B] int64 bit-widths
    best_index: Tensor      #: [B, S] int32 index i of the chosen ratio 1 - i*step
    scale: Tensor           #: [B, S] float32
    zero_point: Tensor      #: [B, S] int32
    lp_err: Tensor          #: [B, S] float64 sum |e|^p at the chosen range
    ratio: Tensor           #: [B, S] float64 chosen shrink ratio 1 - i*step


def _group_range(lo: Tensor, hi: Tensor, per_channel: bool) -> Tuple[Tensor, Tensor]:
    return (lo, hi) if per_channel else (lo.amin().reshape(1), hi.amax().reshape(1))


def _search(m: Tensor, lo: Tensor, hi: Tensor, bits: List[int], spec: QuantizerSpec, be: str, nt: int):
    """Native or reference clipping search over the groups of ``spec``: ``(index, scale, zp, lp) [B, S]``.

    For a group-wise spec, ``lo``/``hi`` are the group ranges ``[C * G]``.
    """
    gs = spec.group_size
    if gs is None:
        lo, hi = _group_range(lo, hi, spec.per_channel)
    bit_arr = np.asarray(bits, dtype=np.int32)
    if be == "native":
        if gs is None:
            out = native().clip_search(m.numpy(), lo.numpy(), hi.numpy(), bit_arr, spec.symmetric, spec.n_grid,
                                       spec.step, spec.p, nt)
        else:
            out = native().group_clip_search(m.numpy(), lo.numpy(), hi.numpy(), bit_arr, gs, spec.symmetric,
                                             spec.n_grid, spec.step, spec.p, nt)
        return tuple(torch.from_numpy(a) for a in out)
    if gs is None:
        return reference.clip_search(m, lo, hi, bits, spec.symmetric, spec.n_grid, spec.step, spec.p)
    return reference.group_clip_search(m, lo, hi, bits, gs, spec.symmetric, spec.n_grid, spec.step, spec.p)


def spec_ranges(m: Tensor, spec: QuantizerSpec, name: str, be: str, nt: int) -> Tuple[Tensor, Tensor]:
    """Finite ranges of matrix ``m``: per row ``[C]``, or per group ``[C * G]`` for a group-wise spec."""
    if spec.group_size is None:
        return finite_minmax(m, name, be, nt)
    return finite_group_minmax(m, spec.group_size, name, be, nt)


def grid_ranges(m: Tensor, lo: Tensor, hi: Tensor, bits: List[int], spec: QuantizerSpec, be: str,
                nt: int) -> Tuple[Tensor, Tensor]:
    """``[B, S]`` scales and zero points of matrix ``m`` (ranges ``lo``/``hi`` of :func:`spec_ranges`) under ``spec``."""
    if spec.clip == "mse":
        _, scale, zp, _ = _search(m, lo, hi, bits, spec, be, nt)
        return scale, zp
    grouped = spec.group_size is not None
    if not grouped:
        lo, hi = _group_range(lo, hi, spec.per_channel)
    scale = torch.empty(len(bits), lo.numel(), dtype=torch.float32)
    zp = torch.empty(len(bits), lo.numel(), dtype=torch.int32)
    for i, b in enumerate(bits):
        if be == "native":
            fn = native().group_qparams if grouped else native().qparams
            s, z = fn(lo.numpy(), hi.numpy(), b, spec.symmetric)
            scale[i], zp[i] = torch.from_numpy(s), torch.from_numpy(z)
        else:
            fn = reference.group_qparams if grouped else reference.qparams
            scale[i], zp[i] = fn(lo, hi, b, spec.symmetric)
    return scale, zp


def spec_qparams(w: Tensor, bits: int, spec: QuantizerSpec, *, ch_axis: int = 0, backend: Optional[str] = None,
                 num_threads: Optional[int] = None, name: str = "tensor") -> Tuple[Tensor, Tensor]:
    """Scale and zero point of ``w`` at ``bits`` under ``spec`` (what :func:`choose_qparams` computes)."""
    bits = check_bits(bits)
    be, nt = resolve_backend(backend), resolve_threads(num_threads)
    m = as_matrix(w, ch_axis, name)
    lo, hi = spec_ranges(m, spec, name, be, nt)
    scale, zp = grid_ranges(m, lo, hi, [bits], spec, be, nt)
    if spec.group_size is not None:
        shape = (m.shape[0], group_count(m.shape[1], spec.group_size))
        return scale[0].reshape(shape), zp[0].reshape(shape)
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
    group_size: Optional[int] = None,
    ch_axis: int = 0,
    backend: Optional[str] = None,
    num_threads: Optional[int] = None,
    name: str = "tensor",
) -> Tuple[Tensor, Tensor]:
    """Scale and zero point for quantizing ``w`` at ``bits``.

    ``clip="minmax"`` uses the full range; ``clip="mse"`` searches ``n_grid``
    shrink ratios ``1 - i*step`` and keeps the one with the lowest ``sum |e|^p``.
    Returns ``(scale float32, zero_point int32)`` of shape ``[C]`` (per channel),
    ``[1]`` (per tensor) or ``[C, G]`` (``group_size``: ``G = ceil(K / group_size)``
    groups per row of the ``[C, K]`` matrix; scales are bfloat16 values).
    """
    spec = QuantizerSpec(per_channel, symmetric, clip, p, n_grid, step, group_size)
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
    group_size: Optional[int] = None,
    ch_axis: int = 0,
    backend: Optional[str] = None,
    num_threads: Optional[int] = None,
    name: str = "tensor",
) -> ClipSearchResult:
    """Search, per bit-width and channel (or tensor), the clipping range with the lowest Lp error.

    Candidate ``i`` (0 ≤ i < n_grid) uses ``(lo*(1-i*step), hi*(1-i*step))`` of the
    zero-including min/max range; ties keep the widest range. One fused pass in
    the native core serves all candidates and all bit-widths. With ``group_size``
    every group of every row is searched on its own (columns ``[C * G]``).
    """
    spec = QuantizerSpec(per_channel, symmetric, clip, p, n_grid, step, group_size)
    bit_list = check_bit_list(bits)
    be, nt = resolve_backend(backend), resolve_threads(num_threads)
    m = as_matrix(w, ch_axis, name)
    lo, hi = spec_ranges(m, spec, name, be, nt)
    idx, scale, zp, err = _search(m, lo, hi, bit_list, spec, be, nt)
    ratio = 1.0 - idx.double() * spec.step
    return ClipSearchResult(np.asarray(bit_list, dtype=np.int64), idx, scale, zp, err, ratio)
