"""Running a job of several ranks on this host for a test: gloo over loopback, bounded in time.

Every rank is a fresh Python process (``subprocess``, its own session so the
whole process tree can be killed), given the environment torchrun would give
it (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, a free
``MASTER_PORT``) plus ``GLOO_SOCKET_IFNAME=lo`` so nothing leaves the
loopback interface, one torch thread, and ``MIXQUANT_DIST_TIMEOUT``. The
harness waits at most ``deadline`` seconds, then kills every rank and fails
the test: a hang is a failure, never a stuck CI job. :func:`torchrun` runs the
real launcher the same way, for the commands that must work under it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_dist_worker.py")


@dataclass
class RankResult:
    rank: int
    returncode: Optional[int]  # None: still running when the others were done (then killed)
    stdout: str
    stderr: str
    seconds: float


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(timeout_s: float, extra: Optional[dict] = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                              "MASTER_PORT", "GROUP_RANK", "LOCAL_WORLD_SIZE")}
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", MIXQUANT_NUM_THREADS="1",
               MIXQUANT_DIST_TIMEOUT=str(timeout_s), PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def _kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:  # pragma: no cover - gone meanwhile
            pass
        p.wait()


def _wait(procs: List[subprocess.Popen], ranks: Sequence[int], deadline: float, logs) -> List[Optional[float]]:
    """Wait for ``procs[r]`` for every ``r`` in ``ranks``; their end times. Kills all and fails after ``deadline``."""
    ends: List[Optional[float]] = [None] * len(procs)
    waiting, limit = set(ranks), time.monotonic() + deadline
    while waiting:
        for r in list(waiting):
            if procs[r].poll() is not None:
                ends[r] = time.monotonic()
                waiting.discard(r)
        if waiting and time.monotonic() > limit:
            for p in procs:
                _kill(p)
            raise AssertionError(f"ranks {sorted(waiting)} did not finish within {deadline} s:\n"
                                 + "\n".join(f"--- rank {r}\n{log.text()[-3000:]}" for r, log in enumerate(logs)))
        time.sleep(0.05)
    return ends


class _Log:
    """A process's stdout and stderr, in temporary files (pipes could fill up and block it)."""

    def __init__(self) -> None:
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")

    @staticmethod
    def _read(fh) -> str:
        fh.flush()
        fh.seek(0)
        return fh.read()

    def text(self) -> str:
        return self._read(self.out) + self._read(self.err)

    def close(self) -> None:
        self.out.close()
        self.err.close()


def run_ranks(argv: Union[Sequence[str], Callable[[int], Sequence[str]]], world: int = 2, *, timeout_s: float = 30,
              deadline: float = 120, cwd: Optional[Callable[[int], str]] = None, env: Optional[dict] = None,
              wait_for: Optional[Sequence[int]] = None) -> List[RankResult]:
    """Start ``world`` ranks running ``python *argv`` (or ``argv(rank)``); wait for the ranks ``wait_for`` (all
    by default), kill the others, and return every rank's outcome (``returncode`` None for a killed one).
    Fails the test after ``deadline`` seconds."""
    port = free_port()
    procs: List[subprocess.Popen] = []
    logs: List[_Log] = []
    starts: List[float] = []
    try:
        for rank in range(world):
            e = base_env(timeout_s, env)
            e.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(port))
            logs.append(_Log())
            starts.append(time.monotonic())
            procs.append(subprocess.Popen([sys.executable, *(argv(rank) if callable(argv) else argv)], env=e,
                                          cwd=cwd(rank) if cwd else None, stdout=logs[-1].out, stderr=logs[-1].err,
                                          start_new_session=True))
        ends = _wait(procs, range(world) if wait_for is None else wait_for, deadline, logs)
        killed = {r for r, p in enumerate(procs) if p.poll() is None}
        for r in killed:
            _kill(procs[r])
        return [RankResult(r, None if r in killed else p.returncode, logs[r]._read(logs[r].out),
                           logs[r]._read(logs[r].err), (ends[r] or time.monotonic()) - starts[r])
                for r, p in enumerate(procs)]
    finally:
        for p in procs:
            _kill(p)
        for log in logs:
            log.close()


def torchrun(args: Sequence[str], nproc: int = 2, *, timeout_s: float = 30, deadline: float = 180,
             cwd: Optional[str] = None, env: Optional[dict] = None) -> RankResult:
    """``python -m torch.distributed.run --nproc_per_node=nproc ARGS`` on loopback; its outcome (``rank`` -1).
    Fails the test after ``deadline`` seconds (the launcher and its workers killed)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--max_restarts=0", *args]
    log = _Log()
    start = time.monotonic()
    p = subprocess.Popen(cmd, env=base_env(timeout_s, env), cwd=cwd, stdout=log.out, stderr=log.err,
                         start_new_session=True)
    try:
        _wait([p], [0], deadline, [log])
        return RankResult(-1, p.returncode, log._read(log.out), log._read(log.err), time.monotonic() - start)
    finally:
        if p.poll() is None:  # its workers run in sessions of their own: let the launcher stop them first
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                pass
        _kill(p)
        log.close()
