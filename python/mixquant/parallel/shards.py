"""How work is split between ranks: every rank computes the same split from the same inputs.

* Items of known cost (a checkpoint's tensors) go to ranks by the
  longest-processing-time rule: largest first, each to the least loaded rank
  (ties to the lower rank), which keeps the largest load within 4/3 of the
  best possible split.
* Samples are split into contiguous blocks (rank ``r`` of ``N`` holds samples
  ``[n r / N, n (r + 1) / N)``), so a rank's shard of a tensor is a view.
"""

from __future__ import annotations

import heapq
from typing import List, Sequence, Tuple

import torch

__all__ = ["assign_by_cost", "block", "local_positions"]


def assign_by_cost(costs: Sequence[int], parts: int) -> List[int]:
    """The rank (``0..parts-1``) of each item, balancing the summed ``costs`` (deterministic)."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    owner = [0] * len(costs)
    if parts == 1:
        return owner
    heap = [(0, r) for r in range(parts)]  # (load, rank): the lowest load first, then the lowest rank
    for i in sorted(range(len(costs)), key=lambda i: (-int(costs[i]), i)):
        load, rank = heapq.heappop(heap)
        owner[i] = rank
        heapq.heappush(heap, (load + int(costs[i]), rank))
    return owner


def block(n: int, rank: int, world_size: int) -> Tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous share of ``n`` items (shares differ by at most one)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return n * rank // world_size, n * (rank + 1) // world_size


def local_positions(idx: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The entries of the global sample indices ``idx`` that fall in ``[start, stop)``, shifted to the shard
    (their order in ``idx`` kept)."""
    keep = (idx >= start) & (idx < stop)
    return idx[keep] - start
