"""Experiments on real pretrained models: MixQuant against uniform bit-widths, with vanilla asymmetric
quantization and with BRECQ, at equal average weight bit-widths.

``mixquant experiment`` (or ``python benchmarks/experiments.py``) runs the grid, writes
``results.json``, the markdown report and the PNG plots. See :func:`run_experiments`.

The names below are imported on first use, so that the command line can read
:mod:`.names` without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any, List

from .names import METHODS, SETUP_NAMES

_EXPORTS = {
    "RECORD_KEYS": "runner", "Job": "runner", "load_results": "runner", "plan_jobs": "runner",
    "run_experiments": "runner", "save_results": "runner",
    "SCALES": "setups", "Scale": "setups", "Setup": "setups", "build_setup": "setups",
}

__all__ = [
    "METHODS", "RECORD_KEYS", "SCALES", "SETUP_NAMES", "Job", "Scale", "Setup", "build_setup", "load_results",
    "plan_jobs", "run_experiments", "save_results",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mixquant.experiments' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_EXPORTS))
