"""BRECQ across the ranks of a ``torchrun`` job: each rank holds a block of the calibration samples.

What every rank does the same way (so no rank waits on another for it): the
units, their order, the random draws (every rank seeds the same generator
and draws the same global batch of ``batch_size`` sample indices each
iteration), the regulariser and the Adam update. What is split: the
calibration samples (rank ``r`` of ``N`` holds the contiguous block
:func:`mixquant.parallel.shards.block`), hence every unit's cache, and the
forward and backward passes of each iteration, which a rank runs on the
members of the global batch it holds.

The reconstruction loss is a mean over the batch's samples; a rank computes
its members' squared errors summed and divided by the *global* batch's count
(:func:`~.cache.rec_loss` with ``of=batch_size``), so every output element's
gradient is the very number one process would compute, and summing the
ranks' gradients (one all-reduce per iteration of the unit's flat soft-weight
gradient, the batch loss riding along, after the backward pass and before the
fused gradient-and-Adam step) gives the gradient of the whole batch. The
regulariser's gradient is added afterwards, inside the fused step, once. The
activation phase sums the step sizes' gradients the same way before Adam.
Losses over the whole cache (the report, the ``never_worse`` choice) are
summed over the ranks; activation ranges take the minimum and maximum over
the ranks. At the end of each unit rank 0's rounding variables, then its
finished layers (codes, scales, zero points), and in the activation phase its
step sizes, are copied to every rank, so all ranks start every unit from the
same model even when their CPUs' kernels round differently.

Equivalence with one process: the draws, the regulariser and Adam's
arithmetic are the same; what differs is float32 summation order, in two
places: the gradient with respect to a weight is a sum over the batch's
samples, which one process forms inside one backward pass and ``N`` ranks as
``N`` partial sums added by the all-reduce; and a unit's cached input is
computed on batches that start at the rank's block, so a kernel may block
its sums differently. Both are rounding differences, so the rounding
variables follow the single-process ones to within rounding, and a hard
decision can differ only where a variable ends within that distance of the
threshold (tests/test_distributed.py measures both).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, TypeVar

import torch
import torch.nn as nn

from ..parallel import comm
from ..parallel.shards import block, local_positions
from ..parallel.workers import SINGLE, Workers
from .cache import NoData, UnitData, Unsupported, eval_loss, rec_loss

__all__ = ["Shard"]

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Rank ``workers.rank``'s block ``[start, stop)`` of ``total`` calibration samples.

    A job of one rank holds every sample, and every collective is a no-op:
    the single-process run takes the same code path.
    """

    workers: Workers
    start: int
    stop: int
    total: int

    @classmethod
    def of(cls, workers: Workers, total: int) -> "Shard":
        """The block of ``total`` samples this rank holds; ValueError when a rank would hold none."""
        if total < workers.world_size:
            raise ValueError(f"{total} calibration samples cannot be shared by {workers.world_size} ranks "
                             "(each needs one at least): give more samples or start fewer ranks")
        start, stop = block(total, workers.rank, workers.world_size)
        return cls(workers, start, stop, total)

    @classmethod
    def whole(cls, total: int) -> "Shard":
        """All ``total`` samples, in a job of one rank."""
        return cls(SINGLE, 0, total, total)

    @property
    def distributed(self) -> bool:
        return self.workers.distributed

    def __len__(self) -> int:
        return self.stop - self.start

    def take(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """This rank's rows of ``t`` (a view)."""
        return None if t is None else t[self.start: self.stop]

    def members(self, idx: torch.Tensor) -> torch.Tensor:
        """The positions, in this rank's cache, of the global batch's members it holds (batch order kept)."""
        if not self.distributed:
            return idx
        return local_positions(idx, self.start, self.stop)

    def backward_batch(self, data: UnitData, forward: Callable[[torch.Tensor], torch.Tensor], idx: torch.Tensor
                       ) -> Optional[torch.Tensor]:
        """This rank's part of the global batch ``idx``: its loss (divided by the *global* count, so
        the ranks' sums add up to the batch mean) after ``backward``; None when it holds no member."""
        local = self.members(idx)
        if not local.numel():
            return None
        x, y, w = data.batch(local)
        loss = rec_loss(forward(x), y, w, data.channel_dim, of=idx.numel())
        loss.backward()
        return loss

    def summed(self, parts: Sequence[Optional[torch.Tensor]], like: Sequence[torch.Tensor], what: str
               ) -> List[torch.Tensor]:
        """``parts`` summed over the ranks in one all-reduce; ``None`` (nothing reached it here) counts as 0.

        Returns new tensors shaped like ``like`` (views of one flat buffer);
        in a job of one rank, ``parts`` themselves (zeros for a ``None``).
        """
        if not self.distributed:
            return [torch.zeros_like(t) if g is None else g for g, t in zip(parts, like)]
        flat = torch.cat([torch.zeros(t.numel(), dtype=t.dtype, device=t.device) if g is None
                          else g.detach().reshape(-1).to(t.dtype) for g, t in zip(parts, like)])
        comm.all_reduce_(self.workers, flat, "sum", what)
        out, at = [], 0
        for t in like:
            out.append(flat[at: at + t.numel()].view(t.shape))
            at += t.numel()
        return out

    def eval_loss(self, unit: nn.Module, data: UnitData, batch_size: int, what: str) -> float:
        """:func:`~.cache.eval_loss` over every rank's cache: the mean over all ``total`` samples."""
        local = eval_loss(unit, data, batch_size)
        if not self.distributed:
            return local
        both = torch.tensor([local * len(data), float(len(data))], dtype=torch.float64)
        comm.all_reduce_(self.workers, both, "sum", what)
        return float(both[0] / both[1])

    def min_max_(self, lows: Iterable[torch.Tensor], highs: Iterable[torch.Tensor], what: str) -> None:
        """Make every tensor of ``lows`` the minimum, of ``highs`` the maximum, over the ranks (in place)."""
        if not self.distributed:
            return
        for tensors, op in ((list(lows), "min"), (list(highs), "max")):
            if not tensors:
                continue
            flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
            comm.all_reduce_(self.workers, flat, op, what)
            at = 0
            for t in tensors:
                t.copy_(flat[at: at + t.numel()].view(t.shape))
                at += t.numel()

    def from_main_(self, tensors: Sequence[torch.Tensor], what: str) -> None:
        """Copy rank 0's values of ``tensors`` into every rank's (in place; one broadcast per dtype)."""
        if not self.distributed or not tensors:
            return
        by_dtype: dict = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():  # the same order on every rank: the order of ``tensors``
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            comm.broadcast_(self.workers, flat, 0, what)
            at = 0
            with torch.no_grad():
                for t in group:
                    t.copy_(flat[at: at + t.numel()].view(t.shape))
                    at += t.numel()

    def layers_from_main_(self, model: nn.Module, names: Iterable[str], what: str) -> None:
        """Copy rank 0's parameters and buffers of the layers ``names`` of ``model`` into every rank's."""
        if not self.distributed:
            return
        self.from_main_([t for name in names for t in model.get_submodule(name).state_dict().values()], what)

    def settled(self, fn: Callable[[], T], what: str) -> T:
        """``fn()`` on this rank; when it fails on any rank, every rank raises (the first failing rank's error).

        ``fn`` must make no collective call (see :func:`mixquant.parallel.comm.settle`).
        """
        result, error = None, None
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it (settle re-raises it here)
            error = exc
        comm.settle(self.workers, error, what)
        return result  # type: ignore[return-value]

    def cached(self, fn: Callable[[], UnitData], what: str) -> UnitData:
        """A unit's cache of this rank's samples, ``fn()``, with the same outcome on every rank.

        :class:`~.cache.NoData` when the unit ran on no rank's samples;
        :class:`~.cache.Unsupported` when it was unsupported on some rank, or
        ran on some ranks' samples only (one process would find that it did
        not run on every sample); any other error is raised on every rank.
        """
        if not self.distributed:
            return fn()
        data, kind, message, error = None, "ok", "", None
        try:
            data = fn()
        except NoData:
            kind = "nodata"
        except Unsupported as exc:
            kind, message = "unsupported", str(exc)
        except Exception as exc:  # noqa: BLE001 - settled below
            error = exc
        comm.settle(self.workers, error, what)
        found = [json.loads(raw.decode("utf-8")) for raw in comm.all_gather_bytes(
            self.workers, json.dumps([kind, message]).encode("utf-8"), f"{what} (sharing each rank's outcome)")]
        kinds = [k for k, _ in found]
        if "unsupported" in kinds:
            rank = kinds.index("unsupported")
            raise Unsupported(found[rank][1] + ("" if rank == self.workers.rank else f" (on rank {rank})"))
        if all(k == "nodata" for k in kinds):
            raise NoData
        if "nodata" in kinds:
            raise Unsupported("the unit did not run once on every calibration sample "
                              f"(not on rank {kinds.index('nodata')}'s)")
        assert data is not None
        return data
