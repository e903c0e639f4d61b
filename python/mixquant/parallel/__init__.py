"""Work across processes and hosts with ``torch.distributed`` (gloo on CPU), started by ``torchrun``.

* :mod:`.workers`: this process's rank among its peers (:class:`Workers`) and
  :class:`RankFailure`, the error when a peer is lost.
* :mod:`.launch`: joining the process group from the environment ``torchrun``
  sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``), with a timeout (``MIXQUANT_DIST_TIMEOUT``); a process not
  started that way is a job of one rank, and nothing is set up.
* :mod:`.comm`: the few collectives mixquant uses, each turning a lost peer (a
  rank that died, was killed or stopped answering within the timeout) into a
  :class:`RankFailure` naming what was being done; :func:`~.comm.settle`
  makes every rank raise the same error when one rank failed on its own.
* :mod:`.shards`: how work is split between ranks (tensors by size, samples in
  contiguous blocks).

This room imports nothing else of mixquant, so every room may use it.
"""

from __future__ import annotations

from .launch import init, shutdown
from .workers import DEFAULT_TIMEOUT_S, ENV_BACKEND, ENV_TIMEOUT, RankFailure, Workers

__all__ = ["RankFailure", "Workers", "init", "shutdown", "DEFAULT_TIMEOUT_S", "ENV_TIMEOUT", "ENV_BACKEND"]
