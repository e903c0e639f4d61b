"""Joining the job's process group from the environment ``torchrun`` sets.

``torchrun --nproc_per_node=N ...`` (or ``python -m torch.distributed.run``)
starts N processes per host and gives each ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. :func:`init` reads them,
checks them, and joins the default process group with gloo (CPU tensors; every
collective mixquant makes is on CPU tensors). Without ``WORLD_SIZE`` (or with
``WORLD_SIZE=1``) the process is a job of one rank and nothing is set up, so
the single-process code path runs unchanged. A group the caller already
initialised is used as it is (and left to the caller to destroy).

The timeout bounds every wait on another rank: joining the group (a rank that
never starts) and each collective (a rank that hangs). A rank that dies is
usually noticed at once (its sockets close); one that hangs, after the
timeout. Waits include legitimate imbalance (one rank still measuring its
share while the others wait at the exchange), so the timeout must exceed the
longest such wait: :data:`DEFAULT_TIMEOUT_S` by default, ``MIXQUANT_DIST_TIMEOUT``
(seconds) or ``init(timeout=...)`` to change it.
"""

from __future__ import annotations

import atexit
import datetime
import math
import os
from typing import Mapping, Optional

from .workers import DEFAULT_TIMEOUT_S, ENV_BACKEND, ENV_TIMEOUT, SINGLE, RankFailure, Workers

__all__ = ["init", "shutdown", "workers_from_env", "BACKENDS", "SINGLE"]

# gloo runs every collective on CPU tensors; NCCL (GPU tensors) is for a GPU job's own use.
BACKENDS = ("gloo", "nccl", "cpu:gloo,cuda:nccl")

_owned = False  # whether init() created the default group (then it is destroyed at exit)


def _env_int(env: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"{name} is not set: start the job with torchrun (or set RANK, WORLD_SIZE, "
                             "MASTER_ADDR and MASTER_PORT for every process)")
        return default
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _timeout(timeout: Optional[float], env: Mapping[str, str]) -> float:
    source = "timeout"
    if timeout is None and env.get(ENV_TIMEOUT):
        source, timeout = ENV_TIMEOUT, env[ENV_TIMEOUT]
        try:
            timeout = float(timeout)
        except ValueError:
            raise ValueError(f"{ENV_TIMEOUT} must be a number of seconds, got {env[ENV_TIMEOUT]!r}") from None
    if timeout is None:
        return DEFAULT_TIMEOUT_S
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or timeout <= 0:
        raise ValueError(f"{source} must be a positive finite number of seconds, got {timeout!r}")
    return float(timeout)


def _backend(backend: Optional[str], env: Mapping[str, str]) -> str:
    source = "backend"
    if backend is None:
        source, backend = ENV_BACKEND, env.get(ENV_BACKEND) or "gloo"
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    return backend


def workers_from_env(env: Optional[Mapping[str, str]] = None, timeout: Optional[float] = None,
                     backend: Optional[str] = None) -> Workers:
    """The :class:`Workers` the environment describes, checked (ValueError naming the bad variable)."""
    env = os.environ if env is None else env
    world = _env_int(env, "WORLD_SIZE", 1)
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world}")
    t = _timeout(timeout, env)
    if world == 1:
        return Workers(timeout_s=t)
    rank = _env_int(env, "RANK")
    if not 0 <= rank < world:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE={world}), got {rank}")
    local_rank = _env_int(env, "LOCAL_RANK", rank)
    if local_rank < 0:
        raise ValueError(f"LOCAL_RANK must be >= 0, got {local_rank}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(name):
            raise ValueError(f"{name} is not set: start the job with torchrun, which sets it")
    port = _env_int(env, "MASTER_PORT")
    if not 0 < port < 65536:
        raise ValueError(f"MASTER_PORT must be a TCP port (1..65535), got {port}")
    return Workers(rank, world, local_rank, t, _backend(backend, env))


def init(timeout: Optional[float] = None, backend: Optional[str] = None) -> Workers:
    """Join the job's process group (or find it already joined) and return this process's :class:`Workers`.

    A process started without ``WORLD_SIZE`` (or with 1) is a job of one rank:
    nothing is set up. ``timeout`` (seconds; else ``MIXQUANT_DIST_TIMEOUT``,
    else :data:`DEFAULT_TIMEOUT_S`) bounds every wait on another rank;
    ``backend`` (else ``MIXQUANT_DIST_BACKEND``, else ``"gloo"``). Raises
    ValueError for a bad environment and :class:`RankFailure` when the group
    cannot be joined within the timeout (a rank that never started, a wrong
    address).
    """
    global _owned
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Workers(dist.get_rank(), dist.get_world_size(), _env_int(os.environ, "LOCAL_RANK", dist.get_rank()),
                       _timeout(timeout, os.environ), dist.get_backend())
    w = workers_from_env(timeout=timeout, backend=backend)
    if not w.distributed:
        return w
    if not dist.is_available():  # pragma: no cover - torch builds without distributed support
        raise ImportError("this torch build has no torch.distributed; install a build that has it")
    addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    try:
        # env:// reads MASTER_ADDR/MASTER_PORT, and under torchrun reuses its agent's store
        dist.init_process_group(w.backend, init_method="env://", rank=w.rank, world_size=w.world_size,
                                timeout=datetime.timedelta(seconds=w.timeout_s))
    except RuntimeError as exc:  # the store's and the backend's errors (DistError is a RuntimeError)
        raise RankFailure(f"{w.label()}: could not join the process group at {addr}:{port} within "
                          f"{w.timeout_s:g} s ({ENV_TIMEOUT}): a rank did not start, or the address is wrong: "
                          f"{_first_line(exc)}") from None
    _owned = True
    atexit.register(shutdown)
    return w


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def shutdown() -> None:
    """Leave the process group if :func:`init` created it (also run at exit); a no-op otherwise."""
    global _owned
    if not _owned:
        return
    _owned = False
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except RuntimeError:  # pragma: no cover - a broken group cannot be left cleanly; the process is ending
            pass
