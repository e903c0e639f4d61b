"""The rules that turn per-layer costs into per-layer bit-widths.

A cost table maps each layer to its cost at each candidate bit-width: a
roundoff-error metric of the weights, or a data-aware sensitivity
(:mod:`.sensitivity`); the rules work the same on any of them.

* QEM rule (the paper's quantization error multiplier): each layer takes the
  smallest candidate ``b`` with ``cost(b) <= qem * cost_ref``; the reference is
  the layer's own cost at ``ref_bits`` (``qem_reference="layer"``) or the
  median over layers of the cost at ``ref_bits`` (``"model"``; for the weight
  table the normalised error, which is comparable across layers).
* Budget rule: minimise the summed cost subject to a parameter-weighted
  average bit-width or a byte budget, solved exactly as a multiple-choice
  knapsack (:mod:`.knapsack`); optionally over (bit-width, group size) pairs,
  with a budget that counts the scales (:func:`budget_layout`, data-free table).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ..core.error import RoundoffError
from ..core.limits import DEFAULT_OBJECTIVE, OBJECTIVES, QEM_REFERENCES
from .bitconfig import layer_bytes
from .knapsack import InfeasibleBudget, solve_mckp

__all__ = ["OBJECTIVES", "QEM_REFERENCES", "DEFAULT_OBJECTIVE", "Costs", "qem_bits", "budget_bits",
           "budget_layout"]

#: layer name -> bit-width -> cost.
Costs = Mapping[str, Mapping[int, float]]


def qem_bits(costs: Costs, free: List[str], candidates: List[int], qem: float, ref_bits: int,
             reference: str) -> Dict[str, int]:
    """The QEM rule for the ``free`` layers (``costs`` must hold ``ref_bits`` and every candidate)."""
    chosen = {}
    if reference == "model":
        model_ref = float(np.median([costs[n][ref_bits] for n in costs]))
    for name in free:
        values = costs[name]
        ref = model_ref if reference == "model" else values[ref_bits]
        ok = [b for b in candidates if values[b] <= qem * ref]
        chosen[name] = ok[0] if ok else candidates[-1]
    return chosen


def _capacity(num_params: Mapping[str, int], avg_bits: Optional[float], max_bytes: Optional[int],
              bits_per_weight: Optional[float]) -> int:
    total = sum(num_params.values())
    if avg_bits is not None:  # in code bits
        return math.floor(avg_bits * total + 1e-9 * total)
    if bits_per_weight is not None:  # in bytes: 8 * bytes <= bits_per_weight * weights
        return math.floor(bits_per_weight * total / 8 + 1e-9 * total)
    return int(max_bytes)


def _solve(names: List[str], options: Mapping[str, list], weight, cost, capacity: int, budget_text: str,
           lightest_text) -> Dict[str, Any]:
    """One option per layer minimising the summed cost within ``capacity`` (the exact knapsack)."""
    weights = [[weight(name, o) for o in options[name]] for name in names]
    costs = [[cost(name, o) for o in options[name]] for name in names]
    try:
        choice = solve_mckp(weights, costs, capacity)
    except InfeasibleBudget:
        lightest = sum(min(w) for w in weights)
        raise ValueError(f"{budget_text} is below the smallest reachable {lightest_text(lightest)}") from None
    return {name: options[name][i] for name, i in zip(names, choice)}


def _error_at(table: RoundoffError, objective: str, bits: int) -> float:
    idx = int(np.searchsorted(table.bits, bits))
    if idx >= len(table.bits) or table.bits[idx] != bits:
        raise KeyError(f"the error table has no entry at {bits} bits")
    return float(getattr(table, objective)[idx])


def budget_bits(costs: Costs, num_params: Mapping[str, int], groups: Mapping[str, int], free: List[str],
                keep: Mapping[str, int], candidates: List[int], avg_bits: Optional[float],
                max_bytes: Optional[int], bits_per_weight: Optional[float] = None,
                grouped: bool = False) -> Dict[str, int]:
    """The budget rule: free layers choose among ``candidates``, kept layers count at their bits.

    ``num_params`` and ``groups`` give each layer's weight count and number of
    (scale, zero point) pairs (group-wise ones when ``grouped``); exactly one of
    ``avg_bits`` (code bits per weight), ``max_bytes`` or ``bits_per_weight``
    (stored bits per weight, scales and zero points included) is set.
    """
    names = free + list(keep)
    options = {name: candidates if name in free else [keep[name]] for name in names}
    n = {name: num_params[name] for name in names}
    capacity = _capacity(n, avg_bits, max_bytes, bits_per_weight)
    if avg_bits is not None:
        weight = lambda name, b: n[name] * b  # noqa: E731
        budget, lightest = f"avg_bits={avg_bits}", lambda w: (
            f"average {w / sum(n.values()):.4f} (every free layer at {candidates[0]} bits, kept layers at their bits)")
    else:
        weight = lambda name, b: layer_bytes(n[name], b, groups[name], grouped)  # noqa: E731
        budget = f"max_bytes={max_bytes}" if max_bytes is not None else f"bits_per_weight={bits_per_weight}"
        lightest = lambda w: (f"size {w} bytes" if max_bytes is not None  # noqa: E731
                              else f"{8 * w / sum(n.values()):.4f} bits per weight")
    return _solve(names, options, weight, lambda name, b: float(costs[name][b]), capacity, budget, lightest)


def budget_layout(tables: Mapping[str, Mapping[Optional[int], RoundoffError]], num_params: Mapping[str, int],
                  groups: Mapping[str, Mapping[Optional[int], int]], free: List[str], keep: Mapping[str, int],
                  candidates: List[int], objective: str, max_bytes: Optional[int],
                  bits_per_weight: Optional[float]) -> Dict[str, Tuple[int, Optional[int]]]:
    """The budget rule over (bit-width, group size) pairs, under a budget that counts the scales.

    ``tables[name][gs]`` is the layer's error table with group size ``gs`` (None:
    per channel) and ``groups[name][gs]`` its number of (scale, zero point)
    pairs; every layer picks one pair (kept layers at their bits, any group
    size). The weight of a pair is its stored size (:func:`layer_bytes`), the
    budget ``max_bytes`` or ``bits_per_weight``.
    """
    names = free + list(keep)
    options = {name: [(b, gs) for b in (candidates if name in free else [keep[name]]) for gs in tables[name]]
               for name in names}
    n = {name: num_params[name] for name in names}
    capacity = _capacity(n, None, max_bytes, bits_per_weight)
    budget = f"max_bytes={max_bytes}" if max_bytes is not None else f"bits_per_weight={bits_per_weight}"
    lightest = lambda w: (f"size {w} bytes" if max_bytes is not None  # noqa: E731
                          else f"{8 * w / sum(n.values()):.4f} bits per weight")
    return _solve(
        names, options,
        lambda name, o: layer_bytes(n[name], o[0], groups[name][o[1]], o[1] is not None),
        lambda name, o: _error_at(tables[name][o[1]], objective, o[0]),
        capacity, budget, lightest,
    )
