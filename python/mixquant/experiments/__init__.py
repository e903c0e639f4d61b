"""Experiments on real pretrained models: MixQuant against uniform bit-widths, with vanilla asymmetric
quantization and with BRECQ, at equal average weight bit-widths.

``mixquant experiment`` (or ``python benchmarks/experiments.py``) runs the grid, writes
``results.json``, the markdown report and the PNG plots. See :func:`run_experiments`.
"""

from .runner import METHODS, RECORD_KEYS, Job, load_results, plan_jobs, run_experiments, save_results
from .setups import SCALES, SETUP_NAMES, Scale, Setup, build_setup

__all__ = [
    "METHODS", "RECORD_KEYS", "SCALES", "SETUP_NAMES", "Job", "Scale", "Setup", "build_setup", "load_results",
    "plan_jobs", "run_experiments", "save_results",
]
