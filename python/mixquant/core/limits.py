"""The quantizer's limits and defaults, written once.

Every check in the Python layer reads these names; the native binding checks
the same numbers (``csrc/quant_limits.h``, exposed as ``mixquant._core.limits()``)
and a test holds the two equal.
"""

from __future__ import annotations

import math

__all__ = [
    "MIN_BITS", "MAX_BITS", "MIN_ACT_BITS", "MAX_ACT_BITS", "MAX_N_GRID", "DEFAULT_N_GRID",
    "DEFAULT_STEP", "DEFAULT_P", "DEFAULT_CANDIDATES", "MAX_CLIP_SCRATCH_BYTES", "CLIP_METHODS",
    "OBJECTIVES", "DEFAULT_OBJECTIVE", "QEM_REFERENCES", "SENSITIVITIES", "DEFAULT_DATA_SENSITIVITY", "OUTPUT_LOSSES",
    "clip_grid_ok", "ADAROUND_GAMMA", "ADAROUND_ZETA",
]

#: Weight bit-widths: codes are unsigned integers in [0, 2**bits - 1], stored in up to 16 bits.
MIN_BITS = 1
MAX_BITS = 16
#: Activation bit-widths (a 1-bit activation grid cannot hold zero and a signal).
MIN_ACT_BITS = 2
MAX_ACT_BITS = 16
#: The clipping-range search: candidate i shrinks the range by 1 - i * step, i < n_grid.
MAX_N_GRID = 100_000
DEFAULT_N_GRID = 80
DEFAULT_STEP = 0.01
#: Exponent of the clipping search's error sum |w - w_hat|^p.
DEFAULT_P = 2.0
#: The search's candidate bit-widths.
DEFAULT_CANDIDATES = range(2, 9)
#: Working memory one native clipping search may allocate (8 GiB).
MAX_CLIP_SCRATCH_BYTES = 2**33
#: Range rules: the zero-including min/max range, or the clipping search.
CLIP_METHODS = ("minmax", "mse")
#: AdaRound's rectified sigmoid h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)
#: (the native rounding kernels use the same two numbers, as float32).
ADAROUND_GAMMA = -0.1
ADAROUND_ZETA = 1.1
#: The search's rules: per-layer errors the budget rule can sum, and the QEM references.
OBJECTIVES = ("mse", "norm", "sse")
DEFAULT_OBJECTIVE = "norm"
QEM_REFERENCES = ("layer", "model")
#: What a layer's cost at a bit-width is: the data-free roundoff error, or one measured on calibration data.
SENSITIVITIES = ("weight", "input", "output", "fisher", "model")
#: What ``mixquant.search`` uses when given calibration data and no sensitivity.
DEFAULT_DATA_SENSITIVITY = "model"
#: How the "model" sensitivity compares the model's outputs.
OUTPUT_LOSSES = ("kl", "cosine", "mse")


def clip_grid_ok(n_grid: int, step: float) -> bool:
    """Whether every clipping factor ``1 - i*step`` (``0 <= i < n_grid``) stays positive."""
    return 1 <= n_grid <= MAX_N_GRID and math.isfinite(step) and step > 0 and (n_grid - 1) * step < 1
