"""Named sizes of a BRECQ run: what the command line offers as ``--preset``.

* ``"cpu"``: sized for a CPU; a few minutes for a CIFAR-sized ResNet, tens of
  minutes for an ImageNet MobileNetV2 on 2 cores (docs/BENCHMARKS.md, "BRECQ presets").
  One torch thread: reconstruction runs many small operations, where a second
  thread gained nothing and, waiting at every operation's barrier, cost CPU
  time and collapsed when the machine was busy (``benchmarks/bench_contention.py``).
* ``"paper"``: BRECQ's ImageNet script (Li et al., ICLR 2021): 20,000
  iterations per unit on 1,024 samples, batch 32; hours per unit on a CPU,
  meant for a GPU (``device="cuda"``).

Each preset sets the same fields of :class:`~mixquant.BrecqOptions` (``num_threads``
None keeps torch's setting); the others keep their defaults. This module imports nothing, so that the command
line's ``--help`` can show the table without loading torch.
"""

from __future__ import annotations

from typing import Dict, Optional

__all__ = ["BRECQ_PRESETS", "DEFAULT_PRESET", "brecq_preset"]

BRECQ_PRESETS: Dict[str, Dict[str, Optional[int]]] = {
    "cpu": {"iters": 200, "act_iters": 100, "num_samples": 256, "batch_size": 16, "num_threads": 1},
    "paper": {"iters": 20000, "act_iters": 5000, "num_samples": 1024, "batch_size": 32, "num_threads": None},
}
DEFAULT_PRESET = "cpu"


def brecq_preset(name: str) -> Dict[str, Optional[int]]:
    """The :class:`~mixquant.BrecqOptions` fields of preset ``name`` (a new dict), e.g.
    ``mixquant.quantize(model, config, "brecq", calib_data=x, **brecq_preset("cpu"))``."""
    if name not in BRECQ_PRESETS:
        raise ValueError(f"unknown BRECQ preset {name!r}; choose from {', '.join(BRECQ_PRESETS)}")
    return dict(BRECQ_PRESETS[name])
