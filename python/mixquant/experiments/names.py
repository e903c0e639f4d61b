"""The studies' names and defaults, importable without torch (the command line's --help shows them)."""

from __future__ import annotations

from typing import Sequence

__all__ = ["SETUP_NAMES", "METHODS", "DEMO_OUT"]

#: The experiment set-ups (:func:`mixquant.experiments.build_setup`).
SETUP_NAMES: Sequence[str] = ("mobilenet_v2", "resnet20", "mnist_ccexam", "mnist_digit")
#: The quantization methods the experiments compare.
METHODS = ("asymmetric", "brecq")
#: The folder ``mixquant demo`` writes its report to.
DEMO_OUT = "mixquant-report"
