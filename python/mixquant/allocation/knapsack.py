"""Exact multiple-choice knapsack: one option per class, minimum total cost under a weight budget.

The budget rule of the search is this problem: every layer (class) picks one
bit-width (option) whose weight is its storage and whose cost is its roundoff
error. It is solved exactly by dynamic programming over Pareto-optimal partial
solutions (weight, cost), processed class by class. Two prunings keep the
frontier small without ever dropping the optimum:

* a partial solution whose cost plus a lower bound on the remaining classes
  (the LP relaxation, a convex piecewise-linear function of the remaining
  budget) exceeds a known feasible solution's cost is dropped;
* a partial solution that weighs more and costs no less than another is dropped.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

__all__ = ["solve_mckp", "InfeasibleBudget"]


class InfeasibleBudget(ValueError):
    """No choice of options fits the budget."""


def _pareto(weights: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated options, by increasing weight and strictly decreasing cost."""
    order = np.lexsort((np.arange(len(weights)), costs, weights))
    keep, best = [], np.inf
    for i in order:
        if costs[i] < best:
            keep.append(i)
            best = costs[i]
    return np.asarray(keep, dtype=np.int64)


def _hull_indices(weights: np.ndarray, costs: np.ndarray) -> List[int]:
    """Indices of the lower convex hull of a Pareto option list (weights increasing)."""
    hull = [0]
    for i in range(1, len(weights)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a -> i
            if (costs[b] - costs[a]) * (weights[i] - weights[a]) >= (costs[i] - costs[a]) * (weights[b] - weights[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _hull_segments(weights: np.ndarray, costs: np.ndarray) -> List[Tuple[float, float]]:
    """Lower convex hull increments (dw, dc) of a Pareto option list."""
    hull = _hull_indices(weights, costs)
    return [(float(weights[j] - weights[i]), float(costs[j] - costs[i])) for i, j in zip(hull, hull[1:])]


class _SuffixBound:
    """LP lower bound on the cost of classes k.. given the budget left for them."""

    def __init__(self, weights: Sequence[np.ndarray], costs: Sequence[np.ndarray]):
        n = len(weights)
        self.min_weight = np.zeros(n + 1, dtype=np.int64)
        self.curves = [(np.zeros(1), np.zeros(1))] * (n + 1)
        segments: List[Tuple[float, float]] = []
        base_w, base_c = 0, 0.0
        for k in range(n - 1, -1, -1):
            base_w += int(weights[k][0])
            base_c += float(costs[k][0])
            segments.extend(_hull_segments(weights[k], costs[k]))
            segments.sort(key=lambda s: s[1] / s[0])  # steepest cost drop per weight first
            dw = np.array([s[0] for s in segments])
            dc = np.array([s[1] for s in segments])
            xs = np.concatenate([[base_w], base_w + np.cumsum(dw)])
            ys = np.concatenate([[base_c], base_c + np.cumsum(dc)])
            self.min_weight[k] = base_w
            self.curves[k] = (xs, ys)

    def __call__(self, k: int, budget: np.ndarray) -> np.ndarray:
        xs, ys = self.curves[k]
        bound = np.interp(budget, xs, ys)  # flat beyond the last breakpoint: every class at its best
        return np.where(budget < xs[0], np.inf, bound)


def _greedy(weights, costs, capacity: int) -> Tuple[List[int], float]:
    """A feasible solution: the LP relaxation's order of hull steps, taking each step that still fits.

    Then any leftover budget buys the single best further change of one class.
    """
    choice = [0] * len(weights)
    used = sum(int(w[0]) for w in weights)
    steps = []
    for k, (w, c) in enumerate(zip(weights, costs)):
        hull = _hull_indices(w, c)
        for a, b in zip(hull, hull[1:]):
            steps.append(((c[b] - c[a]) / (w[b] - w[a]), k, a, b))
    blocked = set()
    for _, k, a, b in sorted(steps):
        if k in blocked or choice[k] != a:
            continue
        extra = int(weights[k][b] - weights[k][a])
        if used + extra <= capacity:
            used += extra
            choice[k] = b
        else:
            blocked.add(k)  # later hull steps of this class depend on this one
    improved = True
    while improved:
        improved = False
        best = (0.0, -1, -1)
        for k, (w, c) in enumerate(zip(weights, costs)):
            for i in range(len(w)):
                if used - int(w[choice[k]]) + int(w[i]) <= capacity and c[i] - c[choice[k]] < best[0]:
                    best = (c[i] - c[choice[k]], k, i)
        if best[1] >= 0:
            k, i = best[1], best[2]
            used += int(weights[k][i] - weights[k][choice[k]])
            choice[k] = i
            improved = True
    return choice, float(sum(c[i] for c, i in zip(costs, choice)))


def solve_mckp(weights: Sequence[Sequence[int]], costs: Sequence[Sequence[float]], capacity: int) -> List[int]:
    """Pick one option per class minimising total cost with total weight <= ``capacity``.

    ``weights[k][i]`` (non-negative ints) and ``costs[k][i]`` (finite floats) describe
    option ``i`` of class ``k``. Returns the chosen option index per class. Ties
    in cost go to the lighter solution, then to the earlier enumeration, so the
    result is deterministic. Raises :class:`InfeasibleBudget` when even the
    lightest options exceed ``capacity``.
    """
    if len(weights) != len(costs) or not weights:
        raise ValueError("weights and costs must list the same, non-zero number of classes")
    keep, ws, cs = [], [], []
    for w, c in zip(weights, costs):
        w = np.asarray(w, dtype=np.int64)
        c = np.asarray(c, dtype=np.float64)
        if w.shape != c.shape or w.ndim != 1 or not len(w):
            raise ValueError("every class needs matching, non-empty weight and cost lists")
        if (w < 0).any() or not np.isfinite(c).all():
            raise ValueError("weights must be non-negative and costs finite")
        idx = _pareto(w, c)
        keep.append(idx)
        ws.append(w[idx])
        cs.append(c[idx])
    lightest = sum(int(w[0]) for w in ws)
    if lightest > capacity:
        raise InfeasibleBudget(f"the budget {capacity} is below the lightest possible choice {lightest}")

    bound = _SuffixBound(ws, cs)
    _, upper = _greedy(ws, cs, capacity)
    slack = 1e-9 * max(1.0, abs(upper))
    state_w = np.zeros(1, dtype=np.int64)
    state_c = np.zeros(1, dtype=np.float64)
    parents, options = [], []
    for k, (w, c) in enumerate(zip(ws, cs)):
        new_w = (state_w[:, None] + w[None, :]).ravel()
        new_c = (state_c[:, None] + c[None, :]).ravel()
        parent = np.repeat(np.arange(len(state_w)), len(w))
        option = np.tile(np.arange(len(w)), len(state_w))
        left = capacity - new_w
        ok = (left >= bound.min_weight[k + 1]) & (new_c + bound(k + 1, left.astype(np.float64)) <= upper + slack)
        new_w, new_c, parent, option = new_w[ok], new_c[ok], parent[ok], option[ok]
        order = np.lexsort((np.arange(len(new_w)), new_c, new_w))
        new_w, new_c, parent, option = new_w[order], new_c[order], parent[order], option[order]
        # Pareto filter: keep a state only if it is cheaper than every lighter one.
        prev_best = np.concatenate([[np.inf], np.minimum.accumulate(new_c)[:-1]])
        front = new_c < prev_best
        state_w, state_c = new_w[front], new_c[front]
        parents.append(parent[front])
        options.append(option[front])
    best = int(np.lexsort((state_w, state_c))[0])
    choice = [0] * len(ws)
    for k in range(len(ws) - 1, -1, -1):
        choice[k] = int(keep[k][options[k][best]])
        best = int(parents[k][best])
    return choice
