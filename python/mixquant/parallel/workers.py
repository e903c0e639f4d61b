"""Who takes part in a job: this process's rank among its peers, and the error when a peer is lost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["Workers", "SINGLE", "RankFailure", "DEFAULT_TIMEOUT_S", "ENV_TIMEOUT", "ENV_BACKEND"]

# Seconds any rank waits for another (joining, each collective); see mixquant.parallel.launch.
DEFAULT_TIMEOUT_S = 600.0
ENV_TIMEOUT = "MIXQUANT_DIST_TIMEOUT"
ENV_BACKEND = "MIXQUANT_DIST_BACKEND"


class RankFailure(RuntimeError):
    """Another rank of the job died, was killed, or did not answer within the timeout."""


@dataclass(frozen=True)
class Workers:
    """This process's place in the job: ``rank`` of ``world_size`` (``local_rank`` on its host).

    ``world_size == 1`` is a job of one process, with no process group.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    backend: Optional[str] = None

    @property
    def distributed(self) -> bool:
        """Whether other ranks take part (collectives do something)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, shows progress and writes outputs."""
        return self.rank == 0

    def label(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


SINGLE = Workers()
