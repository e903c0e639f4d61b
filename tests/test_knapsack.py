"""The budget rule's exact multiple-choice knapsack against brute force."""

import itertools

import numpy as np
import pytest

from mixquant.allocation.knapsack import InfeasibleBudget, solve_mckp


def brute_force(weights, costs, capacity):
    best = None
    for choice in itertools.product(*(range(len(w)) for w in weights)):
        w = sum(weights[k][i] for k, i in enumerate(choice))
        c = sum(costs[k][i] for k, i in enumerate(choice))
        if w <= capacity and (best is None or c < best):
            best = c
    return best


@pytest.mark.parametrize("seed", range(60))
def test_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_classes, n_opts = int(rng.integers(1, 6)), int(rng.integers(1, 5))
    sizes = rng.integers(1, 60, size=n_classes)
    weights = [sizes[k] * np.arange(1, n_opts + 1) for k in range(n_classes)]
    if seed % 3 == 0:  # costs that are not monotone or convex, with ties
        costs = [np.round(rng.random(n_opts), 1) for _ in range(n_classes)]
    else:
        costs = [np.sort(rng.random(n_opts))[::-1] for _ in range(n_classes)]
    lo, hi = sum(w[0] for w in weights), sum(w[-1] for w in weights)
    capacity = int(rng.integers(lo, hi + 1))
    choice = solve_mckp(weights, costs, capacity)
    assert sum(weights[k][i] for k, i in enumerate(choice)) <= capacity
    got = sum(costs[k][i] for k, i in enumerate(choice))
    assert got == pytest.approx(brute_force(weights, costs, capacity), abs=1e-12)


def test_infeasible_budget_raises():
    with pytest.raises(InfeasibleBudget, match="below the lightest"):
        solve_mckp([[10, 20], [5, 6]], [[1.0, 0.5], [1.0, 0.1]], 14)


def test_deterministic_and_fast_on_hundreds_of_layers():
    rng = np.random.default_rng(1)
    bits = np.arange(2, 9)
    sizes = rng.integers(1_000, 2_000_000, size=300)
    weights = [n * bits for n in sizes]
    costs = [(rng.random() + 0.1) * 4.0 ** (-bits) * (1 + 0.3 * rng.random(7)) for _ in sizes]
    capacity = int(3.5 * sizes.sum())
    first = solve_mckp(weights, costs, capacity)
    assert first == solve_mckp(weights, costs, capacity)
    assert sum(w[i] for w, i in zip(weights, first)) <= capacity


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        solve_mckp([[1, 2]], [[1.0, float("nan")]], 5)
    with pytest.raises(ValueError):
        solve_mckp([], [], 5)
