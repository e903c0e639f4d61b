"""Cached unit inputs and targets for reconstruction, and the reconstruction loss.

For each unit BRECQ needs, over the calibration set:

* the unit's input as produced by the network *before* it with everything
  already quantized (so each unit corrects the error accumulated upstream);
* the full-precision network's output of that unit (the target);
* for the Fisher loss, a per-element weight from the gradient of the task loss.

Forward passes stop as soon as the unit has been reached. Everything is kept on
the reconstruction device; the size is ``num_samples x (input + output [+ weight])``
elements of float32 and is checked against a limit while it is gathered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.calib import batches

__all__ = ["UnitData", "Budget", "Unsupported", "NoData", "capture_inputs", "capture_targets", "fisher_labels", "rec_loss", "eval_loss"]


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


class Unsupported(Exception):
    """The unit's input or output is not a single tensor."""


class NoData(Exception):
    """The unit never ran on the calibration data."""


@dataclass
class UnitData:
    """Cached tensors of one unit: inputs ``x``, targets ``y`` and optional loss weights ``w``."""

    x: torch.Tensor
    y: torch.Tensor
    w: Optional[torch.Tensor] = None

    def batch(self, idx: torch.Tensor) -> tuple:
        """``(x, y, w)`` rows ``idx`` (``index_select``: several times faster than ``x[idx]`` on CPU)."""
        pick = lambda t: None if t is None else torch.index_select(t, 0, idx)  # noqa: E731
        return pick(self.x), pick(self.y), pick(self.w)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, self.y, self.w) if t is not None)

    def __len__(self) -> int:
        return self.x.shape[0]


class Budget:
    def __init__(self, limit_bytes: float, what: str) -> None:
        self.limit, self.used, self.what = limit_bytes, 0, what

    def add(self, t: torch.Tensor) -> None:
        self.used += t.numel() * t.element_size()
        if self.used > self.limit:
            raise ValueError(
                f"the reconstruction cache of {self.what} exceeds max_cache_mb={self.limit / 2**20:.0f} "
                f"(num_samples x activation size); lower num_samples or raise max_cache_mb"
            )


@torch.no_grad()
def capture_inputs(
    model: nn.Module, unit: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device, budget: "Budget"
) -> torch.Tensor:
    """The input of ``unit`` for every sample of ``x``, running ``model`` (as it is now) up to the unit."""
    chunks: List[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple) -> None:
        if len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise Unsupported("the unit does not take exactly one tensor")
        t = args[0].detach().float()
        budget.add(t)
        chunks.append(t)
        raise _Stop

    handle = unit.register_forward_pre_hook(hook, prepend=True)
    try:
        for xb in batches(x, batch_size, device):
            try:
                model(xb)
            except _Stop:
                pass
    finally:
        handle.remove()
    if not chunks:
        raise NoData
    return torch.cat(chunks)


def fisher_labels(fp_model: nn.Module, x: torch.Tensor, y: Optional[torch.Tensor], batch_size: int, device: torch.device) -> torch.Tensor:
    """Targets of the task loss for the Fisher weights: the labels, or the FP model's argmax without labels."""
    with torch.no_grad():
        outs = [fp_model(xb) for xb in batches(x, batch_size, device)]
    if not all(isinstance(o, torch.Tensor) and o.dim() == 2 for o in outs):
        raise ValueError("loss='fisher' needs a classifier whose output is logits of shape [batch, classes]")
    if y is not None:
        y = y.to(device).long().reshape(-1)
        classes = outs[0].shape[1]
        if y.numel() != x.shape[0] or (y < 0).any() or (y >= classes).any():
            raise ValueError(f"calib_data labels must be class indices in [0, {classes}) for loss='fisher'")
        return y
    return torch.cat([o.argmax(dim=1) for o in outs])


def capture_targets(
    fp_model: nn.Module,
    unit: nn.Module,
    x: torch.Tensor,
    batch_size: int,
    device: torch.device,
    budget: "Budget",
    labels: Optional[torch.Tensor] = None,
    damping: float = 1.0,
) -> tuple:
    """The FP output of ``unit`` (and, with ``labels``, Fisher weights ``(|dL/dout| + damping)^2``).

    ``L`` is the summed cross-entropy of the FP model against ``labels``, so
    each sample's gradient does not depend on the batch it was computed in.
    """
    outs: List[torch.Tensor] = []
    grads: List[torch.Tensor] = []
    held: List[torch.Tensor] = []

    def hook(_m: nn.Module, _a: tuple, out: object) -> object:
        if not isinstance(out, torch.Tensor):
            raise Unsupported("the unit does not return one tensor")
        t = out.detach().float()
        budget.add(t)
        outs.append(t)
        if labels is None:
            raise _Stop
        live = out.detach().requires_grad_(True)
        held.append(live)
        return live

    handle = unit.register_forward_hook(hook)
    try:
        for i, xb in enumerate(batches(x, batch_size, device)):
            if labels is None:
                with torch.no_grad():
                    try:
                        fp_model(xb)
                    except _Stop:
                        pass
                continue
            with torch.enable_grad():
                logits = fp_model(xb)
                if not held:
                    raise NoData
                lb = labels[i * batch_size : i * batch_size + xb.shape[0]]
                loss = F.cross_entropy(logits, lb, reduction="sum")
                (g,) = torch.autograd.grad(loss, held.pop())
            wgt = (g.abs() + damping).square()
            budget.add(wgt)
            grads.append(wgt)
    finally:
        handle.remove()
    if not outs:
        raise NoData
    return torch.cat(outs), (torch.cat(grads) if grads else None)


def rec_loss(pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Squared error summed over each sample's elements (Fisher-weighted if ``weight``), averaged over samples."""
    d = (pred - target).square()
    if weight is not None:
        d = d * weight
    return d.reshape(d.shape[0], -1).sum(dim=1).mean()


@torch.no_grad()
def eval_loss(unit: nn.Module, data: UnitData, batch_size: int) -> float:
    """:func:`rec_loss` of ``unit`` over all cached samples."""
    total = 0.0
    n = len(data)
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        pred = unit(data.x[sl])
        w = None if data.w is None else data.w[sl]
        total += float(rec_loss(pred, data.y[sl], w)) * pred.shape[0]
    return total / n
