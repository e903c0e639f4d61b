"""Roundoff error of a tensor at every candidate bit-width: the table the MixQuant search reads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

import numpy as np
import torch

from . import reference
from .backend import native, resolve_backend, resolve_threads
from .limits import DEFAULT_CANDIDATES, DEFAULT_N_GRID, DEFAULT_P, DEFAULT_STEP
from .ranges import grid_ranges, spec_ranges
from .spec import QuantizerSpec
from .tensors import as_matrix, check_bit_list

Tensor = torch.Tensor

__all__ = ["RoundoffError", "RowTable", "roundoff_error", "spec_roundoff_error", "row_table", "join_rows",
           "weighted_errors"]


@dataclass(frozen=True)
class RoundoffError:
    """Quantize→dequantize roundoff error of one tensor, one entry per bit-width.

    ``sse`` is ``sum((w - w_hat)**2)``, ``mse`` is ``sse / numel``, ``norm`` is
    ``sse / sum(w**2)`` (1/SQNR; 0 for an all-zero tensor), ``max_abs`` is
    ``max |w - w_hat|``. ``scale``/``zero_point`` have one row per bit-width and one
    column per channel (one column per tensor; with ``group_size``, one column per
    (channel, group) pair in row-major order). ``channel_sse``/``channel_max_abs``
    are per output channel.
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
    group_size: Optional[int] = None

    def totals(self) -> "RoundoffError":
        """A copy with the per-bit-width figures only (``scale``, ``zero_point`` and the per-channel
        tables emptied to ``[B, 0]``): what a search keeps of every layer."""
        empty = np.empty((len(self.bits), 0))
        return dataclasses.replace(self, scale=empty.astype(np.float32), zero_point=empty.astype(np.int32),
                                   channel_sse=empty, channel_max_abs=empty.astype(np.float32))

    def at(self, bits: int) -> dict:
        """The error figures at one bit-width as a dict."""
        idx = int(np.searchsorted(self.bits, bits))
        if idx >= len(self.bits) or self.bits[idx] != bits:
            raise KeyError(f"bit-width {bits} is not in this table {self.bits.tolist()}")
        return {k: float(getattr(self, k)[idx]) for k in ("sse", "mse", "norm", "max_abs")}


@dataclass(frozen=True)
class RowTable:
    """The per-row pieces of an error table, for the rows of one matrix (or a run of its rows).

    ``scale``/``zero_point`` are ``[B, S]`` (``S`` = rows, 1, or rows x groups),
    ``sse``/``max_abs`` ``[B, rows]``, ``energy`` ``[rows]``, ``amax`` the largest |w|.
    :func:`join_rows` turns runs of rows into a :class:`RoundoffError`.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    sse: np.ndarray
    max_abs: np.ndarray
    energy: np.ndarray
    amax: float


def row_table(m: Tensor, bit_list: List[int], spec: QuantizerSpec, be: str, nt: int, name: str) -> RowTable:
    """The table pieces of matrix ``m [C, K]`` under ``spec`` (rows are independent unless per tensor)."""
    gs = spec.group_size
    if be == "native" and spec.clip == "minmax":
        # One native call: min/max, parameters, table and energy, one pass per row.
        if gs is None:
            out = native().minmax_error_table(m.numpy(), bit_list, spec.per_channel, spec.symmetric, nt)
        else:
            out = native().group_minmax_error_table(m.numpy(), bit_list, gs, spec.symmetric, nt)
        lo, hi, scale, zp, sse, max_abs, energy, n_bad = out
        if n_bad:
            raise ValueError(f"{name} contains {n_bad} non-finite value(s) (NaN or Inf)")
    else:
        lo_t, hi_t = spec_ranges(m, spec, name, be, nt)
        scale_t, zp_t = grid_ranges(m, lo_t, hi_t, bit_list, spec, be, nt)
        bit_arr = np.asarray(bit_list, np.int32)
        if be == "native":
            if gs is None:
                sse, max_abs = native().error_table(m.numpy(), scale_t.numpy(), zp_t.numpy(), bit_arr, nt)
                row_lo, row_hi = lo_t, hi_t
            else:
                sse, max_abs = native().group_error_table(m.numpy(), scale_t.numpy(), zp_t.numpy(), bit_arr, gs, nt)
                row_lo = lo_t.reshape(m.shape[0], -1).amin(dim=1)
                row_hi = hi_t.reshape(m.shape[0], -1).amax(dim=1)
            energy = native().row_energy(m.numpy(), row_lo.numpy(), row_hi.numpy(), nt)
        else:  # [B, 1] parameters broadcast over all rows in the reference
            if gs is None:
                sse, max_abs = reference.error_table(m, scale_t, zp_t, bit_list)
            else:
                sse, max_abs = reference.group_error_table(m, scale_t, zp_t, bit_list, gs)
            sse, max_abs = sse.numpy(), max_abs.numpy()
            energy = m.double().square().sum(dim=1).numpy()
        lo, hi, scale, zp = lo_t.numpy(), hi_t.numpy(), scale_t.numpy(), zp_t.numpy()
    amax = float(max(np.abs(lo).max(), np.abs(hi).max()))
    return RowTable(scale, zp, sse, max_abs, energy, amax)


def join_rows(parts: Sequence[RowTable], bit_list: List[int], spec: QuantizerSpec, numel: int,
              name: str) -> RoundoffError:
    """The :class:`RoundoffError` of a matrix from the tables of its runs of rows, in row order.

    Joining runs gives exactly the figures of one call on the whole matrix: every
    per-row value is computed row by row, and the totals are summed afterwards.
    """
    if len(parts) == 1:
        p = parts[0]
        scale, zp, sse, max_abs, energies, amax = p.scale, p.zero_point, p.sse, p.max_abs, p.energy, p.amax
    else:
        if not spec.per_channel:
            raise ValueError("a per-tensor table cannot be joined from runs of rows")
        scale = np.concatenate([p.scale for p in parts], axis=1)
        zp = np.concatenate([p.zero_point for p in parts], axis=1)
        sse = np.concatenate([p.sse for p in parts], axis=1)
        max_abs = np.concatenate([p.max_abs for p in parts], axis=1)
        energies = np.concatenate([p.energy for p in parts])
        amax = max(p.amax for p in parts)
    energy = float(energies.sum())
    # sse >= 0 in double cannot overflow when summed, and max |e| = inf implies sse = inf:
    # the per-bit totals are finite exactly when the whole table is.
    total = sse.sum(axis=1)
    if not np.isfinite(total).all():
        bad = [b for b, t in zip(bit_list, total) if not np.isfinite(t)]
        raise ValueError(f"{name}: the roundoff error at {bad} bits is not finite: values up to {amax:.4g} "
                         "are too close to the float32 limit for the quantization grid (a grid point "
                         "overflows float32); rescale the tensor")
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
        per_channel=spec.per_channel,
        symmetric=spec.symmetric,
        clip=spec.clip,
        group_size=spec.group_size,
    )


def spec_roundoff_error(
    tensor: Tensor, bits: Iterable[int], spec: QuantizerSpec, *, ch_axis: int = 0,
    backend: Optional[str] = None, num_threads: Optional[int] = None, name: str = "tensor",
) -> RoundoffError:
    """Roundoff error of ``tensor`` under ``spec`` (what :func:`roundoff_error` computes)."""
    bit_list = check_bit_list(bits)
    be, nt = resolve_backend(backend), resolve_threads(num_threads)
    m = as_matrix(tensor, ch_axis, name)
    return join_rows([row_table(m, bit_list, spec, be, nt, name)], bit_list, spec, m.numel(), name)


def roundoff_error(
    tensor: Tensor,
    bits: Iterable[int] = DEFAULT_CANDIDATES,
    *,
    per_channel: bool = False,
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
) -> RoundoffError:
    """Roundoff error of ``tensor`` for every candidate bit-width in one pass.

    ``clip="minmax"`` quantizes over the zero-including min/max range;
    ``clip="mse"`` first runs :func:`clip_search` (Lp error with exponent ``p``)
    and measures the error at the chosen range. ``group_size`` (with
    ``per_channel=True``) gives every group of ``group_size`` consecutive weights of
    each row its own parameters (see :class:`~mixquant.core.spec.QuantizerSpec`).
    Raises ValueError (naming
    ``name``) for NaN/Inf, empty tensors and bad bit-widths, TypeError for
    non-float tensors.
    """
    spec = QuantizerSpec(per_channel, symmetric, clip, p, n_grid, step, group_size)
    return spec_roundoff_error(tensor, bits, spec, ch_axis=ch_axis, backend=backend, num_threads=num_threads,
                               name=name)


def weighted_errors(
    tensor: Tensor, weights: Tensor, table: RoundoffError, *, ch_axis: int = 0, backend: Optional[str] = None,
    num_threads: Optional[int] = None, name: str = "tensor",
) -> np.ndarray:
    """Weighted squared errors ``[B, C]``: ``sum_k v[c, k] * (w[c, k] - w_hat[c, k])**2`` per bit-width and row.

    ``w_hat`` uses the quantizers of ``table`` (its scales and zero points, one
    row per bit-width), so the weighted table and the plain one describe the
    same quantizers. ``weights`` has the shape of ``tensor`` or of its ``[C, K]``
    matrix view (one weight per element; the matrix form is what per-row
    statistics give, e.g. a grouped convolution's input moments), or is a
    vector of one weight per column of that view (shared by every row); finite
    and non-negative.
    """
    be, nt = resolve_backend(backend), resolve_threads(num_threads)
    m = as_matrix(tensor, ch_axis, name)
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights of {name} must be a torch.Tensor, got {type(weights).__name__}")
    if weights.dim() == 1:
        v = weights.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if v.numel() != m.shape[1]:
            raise ValueError(f"weights of {name} hold {v.numel()} values, one per column needs {m.shape[1]}")
    elif weights.dim() == 2 and tuple(weights.shape) == tuple(m.shape) and tuple(weights.shape) != tuple(tensor.shape):
        v = as_matrix(weights, 0, f"weights of {name}")  # already in the matrix view's (row, column) order
    else:
        if tuple(weights.shape) != tuple(tensor.shape):
            raise ValueError(f"weights of {name} have shape {tuple(weights.shape)}, the tensor {tuple(tensor.shape)} "
                             f"(or its matrix view {tuple(m.shape)})")
        v = as_matrix(weights, ch_axis, f"weights of {name}")
    scale = torch.from_numpy(np.ascontiguousarray(table.scale))
    zp = torch.from_numpy(np.ascontiguousarray(table.zero_point))
    bits = [int(b) for b in table.bits]
    gs = table.group_size
    if gs is not None:  # groups: each group is a row of its own, padded with zeros (zero error, zero weight)
        c, k = m.shape
        g = -(-k // gs)
        if v.dim() == 1:
            v = v.expand(c, k)
        pad = g * gs - k
        m = torch.nn.functional.pad(m, (0, pad)).reshape(c * g, gs)
        v = torch.nn.functional.pad(v, (0, pad)).reshape(c * g, gs).contiguous()
        rows = weighted_errors(m, v, dataclasses.replace(table, group_size=None), backend=be, num_threads=nt,
                               name=name)
        return rows.reshape(len(bits), c, g).sum(axis=2)
    if be == "native":  # the binding checks the weights (finite, >= 0) in its own pass
        try:
            return native().weighted_error_table(m.numpy(), v.numpy(), scale.numpy(),
                                                 zp.numpy().astype(np.int64), np.asarray(bits, np.int32), nt)
        except ValueError as exc:
            raise ValueError(f"weights of {name}: {exc}") from None
    if not torch.isfinite(v).all() or (v < 0).any():
        raise ValueError(f"weights of {name} must be finite and >= 0")
    return reference.weighted_error_table(m, v, scale, zp, bits).numpy()
