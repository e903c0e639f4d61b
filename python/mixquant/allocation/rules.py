"""The rules that turn error tables into per-layer bit-widths.

* QEM rule (the paper's quantization error multiplier): each layer takes the
  smallest candidate ``b`` with ``err(b) <= qem * err_ref``; the reference is
  the layer's own error at ``ref_bits`` (``qem_reference="layer"``) or the
  median over layers of the normalised error at ``ref_bits`` (``"model"``).
* Budget rule: minimise the summed error (``objective``) subject to a
  parameter-weighted average bit-width or a byte budget, solved exactly as a
  multiple-choice knapsack (:mod:`.knapsack`).
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional

import numpy as np

from ..core.error import RoundoffError
from ..core.limits import DEFAULT_OBJECTIVE, OBJECTIVES, QEM_REFERENCES
from .bitconfig import layer_bytes
from .knapsack import InfeasibleBudget, solve_mckp

__all__ = ["OBJECTIVES", "QEM_REFERENCES", "DEFAULT_OBJECTIVE", "qem_bits", "budget_bits"]


def qem_bits(tables: Mapping[str, RoundoffError], free: List[str], candidates: List[int], qem: float,
             ref_bits: int, reference: str) -> Dict[str, int]:
    """The QEM rule for the ``free`` layers (``tables`` must hold ``ref_bits`` and every candidate)."""
    chosen = {}
    if reference == "model":
        model_ref = float(np.median([tables[n].at(ref_bits)["norm"] for n in tables]))
    for name in free:
        t = tables[name]
        metric, ref = ("norm", model_ref) if reference == "model" else ("sse", t.at(ref_bits)["sse"])
        values = {int(b): float(v) for b, v in zip(t.bits, getattr(t, metric))}
        ok = [b for b in candidates if values[b] <= qem * ref]
        chosen[name] = ok[0] if ok else candidates[-1]
    return chosen


def budget_bits(tables: Mapping[str, RoundoffError], num_params: Mapping[str, int], groups: Mapping[str, int],
                free: List[str], keep: Mapping[str, int], candidates: List[int], objective: str,
                avg_bits: Optional[float], max_bytes: Optional[int]) -> Dict[str, int]:
    """The budget rule: free layers choose among ``candidates``, kept layers count at their bits.

    ``num_params`` and ``groups`` give each layer's weight count and number of
    (scale, zero point) pairs; exactly one of ``avg_bits`` / ``max_bytes`` is set.
    """
    names = free + list(keep)
    options = {name: candidates if name in free else [keep[name]] for name in names}
    n = {name: num_params[name] for name in names}
    if avg_bits is not None:
        weight = lambda name, b: n[name] * b  # noqa: E731
        total = sum(n.values())
        capacity = math.floor(avg_bits * total + 1e-9 * total)
    else:
        weight = lambda name, b: layer_bytes(n[name], b, groups[name])  # noqa: E731
        capacity = int(max_bytes)
    costs, weights = [], []
    for name in names:
        t = tables[name]
        per_bit = {int(b): float(v) for b, v in zip(t.bits, getattr(t, objective))}
        costs.append([per_bit[b] for b in options[name]])
        weights.append([weight(name, b) for b in options[name]])
    try:
        choice = solve_mckp(weights, costs, capacity)
    except InfeasibleBudget:
        lightest = sum(w[0] for w in weights)
        if avg_bits is not None:
            raise ValueError(f"avg_bits={avg_bits} is below the smallest reachable average "
                             f"{lightest / sum(n.values()):.4f} (every free layer at {candidates[0]} bits, "
                             f"kept layers at their bits)") from None
        raise ValueError(f"max_bytes={max_bytes} is below the smallest reachable size {lightest} bytes") from None
    return {name: options[name][i] for name, i in zip(names, choice)}
