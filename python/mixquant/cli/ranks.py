"""The commands under ``torchrun``: every rank runs the command, rank 0 checks and writes the output.

A command started without torchrun is a job of one rank and these helpers
cost nothing. Under torchrun, the other ranks never look at ``--out`` (on
another host its folder may not exist), and every rank learns of rank 0's
outcome, so a bad destination or a failed write stops all of them with the
same error instead of leaving some waiting.
"""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

from ..parallel import comm, launch
from ..parallel.workers import Workers

__all__ = ["join", "on_main", "on_every", "where"]

T = TypeVar("T")


def join() -> Workers:
    """This process's :class:`Workers` (joining the process group when started by torchrun)."""
    return launch.init()


def on_main(w: Workers, fn: Callable[[], T], what: str) -> Optional[T]:
    """Run ``fn`` on rank 0 only and make every rank raise its error, if any; rank 0's result (None elsewhere)."""
    return on_every(w, fn if w.is_main else lambda: None, what)


def on_every(w: Workers, fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on every rank; if it fails on any, every rank raises (the first failing rank's error).

    ``fn`` must make no collective call: a rank that failed would wait in
    :func:`~mixquant.parallel.comm.settle` while the others wait in ``fn``.
    """
    result, error = None, None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - every rank must learn of it (settle re-raises it here)
        error = exc
    comm.settle(w, error, what)
    return result


def where() -> str:
    """`` (rank r of N)`` inside a job of several ranks, else the empty string (for error messages)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return f" (rank {dist.get_rank()} of {dist.get_world_size()})"
    except (ImportError, RuntimeError):  # pragma: no cover
        pass
    return ""
