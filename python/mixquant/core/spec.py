"""``QuantizerSpec``: everything that describes a weight quantizer besides its bit-width.

The search measures errors with a spec, the config records it, and every
method applies it: passing one object down (instead of six loose arguments)
is what keeps the quantizer a config was searched with and the one a method
applies the same.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .limits import CLIP_METHODS, DEFAULT_N_GRID, DEFAULT_P, DEFAULT_STEP, MAX_N_GRID, clip_grid_ok

__all__ = ["QuantizerSpec"]


@dataclass(frozen=True)
class QuantizerSpec:
    """A weight quantizer: granularity, symmetry and range rule.

    Attributes:
        per_channel: one (scale, zero point) per output channel, else one per tensor.
        symmetric: symmetric grid (``zero_point = 2**(bits-1)``), else asymmetric.
        clip: ``"minmax"`` (the zero-including min/max range) or ``"mse"`` (the
            clipping-range search with the lowest ``sum |w - w_hat|^p``).
        p: exponent of the clipping search's error.
        n_grid, step: the clipping search tries ratios ``1 - i*step``, ``0 <= i < n_grid``.
    """

    per_channel: bool = True
    symmetric: bool = False
    clip: str = "minmax"
    p: float = DEFAULT_P
    n_grid: int = DEFAULT_N_GRID
    step: float = DEFAULT_STEP

    def __post_init__(self) -> None:
        for name in ("per_channel", "symmetric"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
            object.__setattr__(self, name, bool(getattr(self, name)))
        if self.clip not in CLIP_METHODS:
            raise ValueError(f"clip must be one of {CLIP_METHODS}, got {self.clip!r}")
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float, np.number)) \
                or not math.isfinite(self.p) or self.p <= 0:
            raise ValueError(f"p must be a finite positive number, got {self.p!r}")
        object.__setattr__(self, "p", float(self.p))
        if isinstance(self.n_grid, bool) or not isinstance(self.n_grid, (int, np.integer)) \
                or not 1 <= self.n_grid <= MAX_N_GRID:
            raise ValueError(f"n_grid must be an int in 1..{MAX_N_GRID}, got {self.n_grid!r}")
        object.__setattr__(self, "n_grid", int(self.n_grid))
        if isinstance(self.step, bool) or not isinstance(self.step, (int, float, np.number)) \
                or not clip_grid_ok(self.n_grid, float(self.step)):
            raise ValueError(f"step must be > 0 with (n_grid - 1) * step < 1 (every clipping ratio positive), "
                             f"got step={self.step!r}, n_grid={self.n_grid}")
        object.__setattr__(self, "step", float(self.step))

    def replace(self, **changes: Any) -> "QuantizerSpec":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line: ``per-channel asymmetric clip=minmax`` (``p`` shown for the clipping search)."""
        text = (f"{'per-channel' if self.per_channel else 'per-tensor'} "
                f"{'symmetric' if self.symmetric else 'asymmetric'} clip={self.clip}")
        return text + (f" p={self.p:g}" if self.clip == "mse" else "")
