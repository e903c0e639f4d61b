"""The studies' names and defaults, importable without torch (the command line's --help shows them)."""

from __future__ import annotations

from typing import Sequence

__all__ = ["SETUP_NAMES", "METHODS", "DEMO_OUT", "MODEL_NAMES", "display_name"]

#: The experiment set-ups (:func:`mixquant.experiments.build_setup`).
SETUP_NAMES: Sequence[str] = ("mobilenet_v2", "resnet20", "mnist_ccexam", "mnist_digit")
#: The quantization methods the experiments compare.
METHODS = ("asymmetric", "brecq")
#: The folder ``mixquant demo`` writes its report to.
DEMO_OUT = "mixquant-report"
#: How every plot and table names the models.
MODEL_NAMES = {"mobilenet_v2": "MobileNetV2", "resnet20": "ResNet-20", "mnist_ccexam": "MNIST CNN (ccexam)",
               "mnist_digit": "MNIST CNN (digit)"}


def display_name(model: str) -> str:
    """The name plots give ``model`` (its key when it has none)."""
    return MODEL_NAMES.get(model, model)
