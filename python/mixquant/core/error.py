"""Roundoff error of a tensor at every candidate bit-width: the table the MixQuant search reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch

from . import reference
from .backend import native, resolve_backend, resolve_threads
from .limits import DEFAULT_CANDIDATES, DEFAULT_N_GRID, DEFAULT_P, DEFAULT_STEP
from .ranges import grid_ranges
from .spec import QuantizerSpec
from .tensors import as_matrix, check_bit_list, finite_minmax

Tensor = torch.Tensor

__all__ = ["RoundoffError", "roundoff_error", "spec_roundoff_error", "weighted_errors"]


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


def spec_roundoff_error(
    tensor: Tensor, bits: Iterable[int], spec: QuantizerSpec, *, ch_axis: int = 0,
    backend: Optional[str] = None, num_threads: Optional[int] = None, name: str = "tensor",
) -> RoundoffError:
    """Roundoff error of ``tensor`` under ``spec`` (what :func:`roundoff_error` computes)."""
    bit_list = check_bit_list(bits)
    be, nt = resolve_backend(backend), resolve_threads(num_threads)
    m = as_matrix(tensor, ch_axis, name)
    if be == "native" and spec.clip == "minmax":
        # One native call: min/max, parameters, table and energy, one pass per channel.
        lo, hi, scale, zp, sse, max_abs, row_energy, n_bad = native().minmax_error_table(
            m.numpy(), bit_list, spec.per_channel, spec.symmetric, nt)
        if n_bad:
            raise ValueError(f"{name} contains {n_bad} non-finite value(s) (NaN or Inf)")
        energy = float(row_energy.sum())
    else:
        lo, hi = finite_minmax(m, name, be, nt)
        scale, zp = grid_ranges(m, lo, hi, bit_list, spec, be, nt)
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
        per_channel=spec.per_channel,
        symmetric=spec.symmetric,
        clip=spec.clip,
    )


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
    spec = QuantizerSpec(per_channel, symmetric, clip, p, n_grid, step)
    return spec_roundoff_error(tensor, bits, spec, ch_axis=ch_axis, backend=backend, num_threads=num_threads,
                               name=name)


def weighted_errors(
    tensor: Tensor, weights: Tensor, table: RoundoffError, *, ch_axis: int = 0, backend: Optional[str] = None,
    num_threads: Optional[int] = None, name: str = "tensor",
) -> np.ndarray:
    """Weighted squared errors ``[B, C]``: ``sum_k v[c, k] * (w[c, k] - w_hat[c, k])**2`` per bit-width and row.

    ``w_hat`` uses the quantizers of ``table`` (its scales and zero points, one
    row per bit-width), so the weighted table and the plain one describe the
    same quantizers. ``weights`` has the shape of ``tensor`` (one weight per
    element) or is a vector of one weight per column of the ``[C, K]`` matrix
    view (shared by every row); finite and non-negative.
    """
    be, nt = resolve_backend(backend), resolve_threads(num_threads)
    m = as_matrix(tensor, ch_axis, name)
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights of {name} must be a torch.Tensor, got {type(weights).__name__}")
    if weights.dim() == 1:
        v = weights.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if v.numel() != m.shape[1]:
            raise ValueError(f"weights of {name} hold {v.numel()} values, one per column needs {m.shape[1]}")
    else:
        if tuple(weights.shape) != tuple(tensor.shape):
            raise ValueError(f"weights of {name} have shape {tuple(weights.shape)}, the tensor {tuple(tensor.shape)}")
        v = as_matrix(weights, ch_axis, f"weights of {name}")
    scale = torch.from_numpy(np.ascontiguousarray(table.scale))
    zp = torch.from_numpy(np.ascontiguousarray(table.zero_point))
    bits = [int(b) for b in table.bits]
    if be == "native":  # the binding checks the weights (finite, >= 0) in its own pass
        try:
            return native().weighted_error_table(m.numpy(), v.numpy(), scale.numpy(),
                                                 zp.numpy().astype(np.int64), np.asarray(bits, np.int32), nt)
        except ValueError as exc:
            raise ValueError(f"weights of {name}: {exc}") from None
    if not torch.isfinite(v).all() or (v < 0).any():
        raise ValueError(f"weights of {name} must be finite and >= 0")
    return reference.weighted_error_table(m, v, scale, zp, bits).numpy()
