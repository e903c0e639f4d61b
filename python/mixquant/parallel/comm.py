"""The collectives mixquant uses, with a lost peer turned into a clear error.

Every function takes the :class:`~.launch.Workers` of the job and does nothing
for a job of one rank, so callers need no second code path. A collective that
fails because another rank died, was killed or stopped answering within the
timeout raises :class:`RankFailure` on this rank, naming what was being done
(gloo's own message, kept as the last part, says which peer).

Errors that one rank meets on its own (its share of a checkpoint holds a NaN,
its output folder is missing) would leave the others waiting at the next
collective until the timeout. :func:`settle` is the remedy: after a phase,
every rank reports whether it failed, and all of them raise the first failing
rank's error. Messages cross between ranks as UTF-8 JSON (never pickles).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Iterator, List, Optional

import torch

from .workers import ENV_TIMEOUT, RankFailure, Workers

__all__ = ["RankFailure", "all_reduce_", "broadcast_", "all_gather_bytes", "barrier", "settle"]

MAX_MESSAGE = 2000  # characters of an error message sent to the other ranks
# Errors re-raised with their own type on the other ranks; any other type arrives as a RuntimeError.
_TYPES = {t.__name__: t for t in (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError,
                                   PermissionError, NotADirectoryError, IsADirectoryError, OSError, ImportError,
                                   MemoryError, RuntimeError)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


@contextmanager
def _guard(w: Workers, what: str) -> Iterator[None]:
    try:
        yield
    except RankFailure:
        raise
    except RuntimeError as exc:  # gloo's and the store's errors (DistBackendError is a RuntimeError)
        raise RankFailure(f"{w.label()}: {what} failed: another rank died, was killed or did not answer within "
                          f"{w.timeout_s:g} s ({ENV_TIMEOUT}); see that rank's output. "
                          f"[{_first_line(exc)}]") from None


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def _staged(w: Workers, t: torch.Tensor) -> torch.Tensor:
    """``t`` itself where the backend takes it, else a contiguous CPU copy (gloo works on CPU tensors)."""
    if (t.device.type != "cpu" and w.backend == "gloo") or not t.is_contiguous():
        return t.detach().to("cpu", copy=True).contiguous()
    return t


def all_reduce_(w: Workers, t: torch.Tensor, op: str = "sum", what: str = "all-reduce") -> torch.Tensor:
    """Reduce ``t`` over all ranks, in place (``op``: "sum", "max" or "min"); return it.

    Every rank ends with the same values: gloo reduces each element along one
    fixed path and copies the result to every rank.
    """
    if not w.distributed:
        return t
    import torch.distributed as dist

    with _guard(w, what):
        staged = _staged(w, t)
        dist.all_reduce(staged, op=getattr(dist.ReduceOp, _OPS[op]))
        if staged is not t:
            t.copy_(staged)
    return t


def broadcast_(w: Workers, t: torch.Tensor, src: int = 0, what: str = "broadcast") -> torch.Tensor:
    """Copy rank ``src``'s ``t`` into every rank's ``t`` (same shape and dtype everywhere); return it."""
    if not w.distributed:
        return t
    import torch.distributed as dist

    with _guard(w, what):
        staged = _staged(w, t)
        dist.broadcast(staged, src=src)
        if staged is not t:
            t.copy_(staged)
    return t


def barrier(w: Workers, what: str = "barrier") -> None:
    """Wait until every rank is here (a one-element all-reduce, which gloo bounds by the timeout)."""
    all_reduce_(w, torch.zeros(1), "sum", what)


def all_gather_bytes(w: Workers, data: bytes, what: str = "exchange") -> List[bytes]:
    """Every rank's ``data``, in rank order."""
    if not w.distributed:
        return [bytes(data)]
    import torch.distributed as dist

    with _guard(w, what):
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(w.world_size)]
        dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64))
        longest = max(int(s) for s in sizes)
        mine = torch.zeros(max(longest, 1), dtype=torch.uint8)
        if data:
            mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        parts = [torch.empty_like(mine) for _ in range(w.world_size)]
        dist.all_gather(parts, mine)
    return [p[: int(s)].numpy().tobytes() for p, s in zip(parts, sizes)]


def _encode(exc: Optional[BaseException]) -> bytes:
    if exc is None:
        return b""
    return json.dumps({"type": type(exc).__name__, "message": str(exc)[:MAX_MESSAGE]}).encode("utf-8")


def _decode(raw: bytes) -> "tuple[str, str]":
    try:
        obj = json.loads(raw.decode("utf-8"))
        return str(obj["type"]), str(obj["message"])
    except (ValueError, KeyError, TypeError):  # not what settle() sends: say so rather than guess
        return "RuntimeError", "(an unreadable error report)"


def settle(w: Workers, exc: Optional[BaseException], what: str) -> None:
    """Make every rank agree on the outcome of a phase that each ran on its own.

    Each rank passes the exception it caught (or None). If any rank failed,
    every rank raises: the failing rank its own exception, the others the
    first failing rank's error, same type where it is a common one (ValueError,
    TypeError, OSError kinds, ...), its message prefixed with that rank. A
    :class:`RankFailure` is raised at once (the group is already broken).
    """
    if isinstance(exc, RankFailure) or not w.distributed:
        if exc is not None:
            raise exc
        return
    reports = all_gather_bytes(w, _encode(exc), f"{what} (sharing each rank's outcome)")
    failed = [r for r, raw in enumerate(reports) if raw]
    if not failed:
        return
    if exc is not None:
        raise exc
    first = failed[0]
    kind, message = _decode(reports[first])
    raise _TYPES.get(kind, RuntimeError)(f"rank {first} of {w.world_size} ({what}): {message}")
