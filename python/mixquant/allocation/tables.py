"""Error tables: every layer's roundoff error at each of its candidate bit-widths."""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch.nn as nn

from ..core.error import RoundoffError, spec_roundoff_error
from ..core.spec import QuantizerSpec
from ..nn.layers import channel_axis

__all__ = ["error_tables", "layout_tables", "table_dict", "totals_size", "pack_totals", "unpack_totals"]

# What a search keeps of a table (RoundoffError.totals), as a flat float64 vector:
# [energy, sse[B], mse[B], norm[B], max_abs[B]]. Every figure is float64 already, so the round trip is exact.
_TOTALS = ("sse", "mse", "norm", "max_abs")


def error_tables(
    layers: Mapping[str, nn.Module],
    bits: Dict[str, List[int]],
    spec: QuantizerSpec,
    *,
    backend: Optional[str] = None,
    num_threads: Optional[int] = None,
    progress: bool = False,
) -> Dict[str, RoundoffError]:
    """Roundoff-error table of every layer's weight under ``spec`` at its candidate bit-widths ``bits[name]``."""
    items = list(layers.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="roundoff error", unit="layer")
    return {
        name: spec_roundoff_error(module.weight, bits[name], spec, ch_axis=channel_axis(module), backend=backend,
                                  num_threads=num_threads, name=f"weight of layer {name!r}")
        for name, module in items
    }


def layout_tables(
    layers: Mapping[str, nn.Module],
    bits: Dict[str, List[int]],
    spec: QuantizerSpec,
    group_sizes: Sequence[Optional[int]],
    *,
    backend: Optional[str] = None,
    num_threads: Optional[int] = None,
    progress: bool = False,
) -> Dict[str, Dict[Optional[int], RoundoffError]]:
    """Every layer's table under ``spec`` with each of ``group_sizes`` (None: per channel): ``[name][group_size]``.

    Only the per-bit-width figures are kept (:meth:`RoundoffError.totals`): the
    per-group parameters of a large model would take as much memory as its weights.
    """
    items = list(layers.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="roundoff error", unit="layer")
    return {
        name: {gs: spec_roundoff_error(module.weight, bits[name], spec.replace(group_size=gs),
                                       ch_axis=channel_axis(module), backend=backend, num_threads=num_threads,
                                       name=f"weight of layer {name!r}").totals()
               for gs in group_sizes}
        for name, module in items
    }


def table_dict(err: RoundoffError) -> Dict[str, List[float]]:
    """A table as the plain lists a :class:`~mixquant.allocation.bitconfig.BitConfig` records."""
    return {
        "bits": [int(b) for b in err.bits],
        "sse": err.sse.tolist(),
        "mse": err.mse.tolist(),
        "norm": err.norm.tolist(),
        "max_abs": err.max_abs.tolist(),
    }


def totals_size(n_bits: int) -> int:
    """Length of the vector :func:`pack_totals` writes for a table of ``n_bits`` bit-widths."""
    return 1 + len(_TOTALS) * n_bits


def pack_totals(err: RoundoffError, out: np.ndarray) -> None:
    """Write the per-bit-width figures of ``err`` into the float64 vector ``out`` (:func:`totals_size` long)."""
    b = len(err.bits)
    if out.shape != (totals_size(b),):
        raise ValueError(f"out must have shape ({totals_size(b)},), got {out.shape}")
    out[0] = err.energy
    for i, name in enumerate(_TOTALS):
        out[1 + i * b: 1 + (i + 1) * b] = getattr(err, name)


def unpack_totals(vec: np.ndarray, bits: Sequence[int], numel: int, spec: QuantizerSpec) -> RoundoffError:
    """The table (per-bit-width figures only, as :meth:`RoundoffError.totals`) that :func:`pack_totals` wrote."""
    b = len(bits)
    if vec.shape != (totals_size(b),):
        raise ValueError(f"vec must have shape ({totals_size(b)},), got {vec.shape}")
    vec = np.asarray(vec, dtype=np.float64)
    figures = {name: vec[1 + i * b: 1 + (i + 1) * b].copy() for i, name in enumerate(_TOTALS)}
    empty = np.empty((b, 0))
    return RoundoffError(bits=np.asarray(list(bits), dtype=np.int64), **figures,
                         scale=empty.astype(np.float32), zero_point=empty.astype(np.int32), channel_sse=empty,
                         channel_max_abs=empty.astype(np.float32), numel=int(numel), energy=float(vec[0]),
                         per_channel=spec.per_channel, symmetric=spec.symmetric, clip=spec.clip,
                         group_size=spec.group_size)
