"""Error tables: every layer's roundoff error at each of its candidate bit-widths."""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch.nn as nn

from ..core.error import RoundoffError, spec_roundoff_error
from ..core.spec import QuantizerSpec
from ..nn.layers import channel_axis

__all__ = ["error_tables", "layout_tables", "table_dict"]


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
