"""``QuantizerSpec``: everything that describes a weight quantizer besides its bit-width.

Granularity: one (scale, zero point) per tensor, per output channel, or per
group. Groups are defined on the weight viewed as the ``[C, K]`` matrix of
:func:`mixquant.core.tensors.as_matrix` (output channels x everything else,
flattened): each row is cut into ``ceil(K / group_size)`` groups of
``group_size`` consecutive elements, the last one possibly short.

The search measures errors with a spec, the config records it, and every
method applies it: passing one object down (instead of six loose arguments)
is what keeps the quantizer a config was searched with and the one a method
applies the same.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .limits import CLIP_METHODS, DEFAULT_N_GRID, DEFAULT_P, DEFAULT_STEP, MAX_N_GRID, clip_grid_ok

__all__ = ["QuantizerSpec", "check_group_size"]


def check_group_size(group_size: object, name: str = "group_size") -> Optional[int]:
    """None, or a validated group size (an int >= 1)."""
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise TypeError(f"{name} must be None or an int >= 1, got {type(group_size).__name__}")
    if group_size < 1:
        raise ValueError(f"{name} must be >= 1, got {group_size}")
    return int(group_size)


@dataclass(frozen=True)
class QuantizerSpec:
    """A weight quantizer: granularity, symmetry and range rule.

    Attributes:
        per_channel: one (scale, zero point) per output channel, else one per tensor.
        group_size: None, or one (scale, zero point) per group of ``group_size``
            consecutive weights of each output channel's row (needs ``per_channel``).
            Group scales are stored as bfloat16 (rounded up, so the range stays on
            the grid) and zero points at the layer's bit-width.
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
    group_size: Optional[int] = None

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
        object.__setattr__(self, "group_size", check_group_size(self.group_size))
        if self.group_size is not None and not self.per_channel:
            raise ValueError(f"group_size={self.group_size} needs per_channel=True: groups split each output "
                             "channel's row, a per-tensor quantizer has no rows")

    def replace(self, **changes: Any) -> "QuantizerSpec":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line: ``per-channel asymmetric clip=minmax`` (``p`` shown for the clipping search)."""
        gran = f"group-{self.group_size}" if self.group_size else ("per-channel" if self.per_channel else "per-tensor")
        text = (f"{gran} "
                f"{'symmetric' if self.symmetric else 'asymmetric'} clip={self.clip}")
        return text + (f" p={self.p:g}" if self.clip == "mse" else "")
