"""Cached unit inputs and targets for reconstruction, and the reconstruction loss.

For each unit BRECQ needs, over the calibration set:

* the unit's input as produced by the network *before* it with everything
  already quantized (so each unit corrects the error accumulated upstream);
* the full-precision network's output of that unit (the target);
* for the Fisher loss, a per-element weight from the gradient of the task loss.

Forward passes stop as soon as the unit has been reached. Everything is kept on
the reconstruction device, in float32. Memory is checked before it is taken: a
probe pass over the first calibration batch gives the unit's per-sample input
and output sizes, the whole cache (``num_samples x (input + output [+ weight])``
elements) is compared with the limit, and only then are the buffers allocated
once, at their final size, and filled batch by batch (no list of chunks, no
concatenation: the cache never exists twice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.calib import batches

__all__ = ["UnitData", "CacheShape", "Unsupported", "NoData", "probe_unit", "check_cache_size", "capture_inputs",
           "capture_targets", "fisher_labels", "rec_loss", "eval_loss"]

FLOAT_BYTES = 4  # the cache is float32


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


class Unsupported(Exception):
    """The unit's input or output is not a single tensor."""


class NoData(Exception):
    """The unit never ran on the calibration data."""


@dataclass
class UnitData:
    """Cached tensors of one unit: inputs ``x``, targets ``y`` and optional loss weights ``w``.

    ``channel_dim`` is the output axis the reconstruction loss sums over
    (:func:`rec_loss`). 4-D caches are usually held channels-last
    (:func:`probe_unit` decides); their batches keep that layout.
    """

    x: torch.Tensor
    y: torch.Tensor
    w: Optional[torch.Tensor] = None
    channel_dim: int = 1

    def batch(self, idx: torch.Tensor) -> tuple:
        """``(x, y, w)`` rows ``idx`` (``index_select``: several times faster than ``x[idx]`` on CPU)."""
        return _rows(self.x, idx), _rows(self.y, idx), None if self.w is None else _rows(self.w, idx)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, self.y, self.w) if t is not None)

    def __len__(self) -> int:
        return self.x.shape[0]


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        # index_select returns a contiguous NCHW tensor; on the NHWC view it keeps the layout
        return torch.index_select(t.permute(0, 2, 3, 1), 0, idx).permute(0, 3, 1, 2)
    return torch.index_select(t, 0, idx)


@dataclass(frozen=True)
class CacheShape:
    """Per-sample shapes of a unit's input and output, and the measured working set of one step.

    ``step_bytes`` is what one optimisation step holds besides the cache, as
    measured on the first calibration batch: the tensors autograd saves for
    the unit's backward pass, the batch copies of input, target (and weight),
    and the output with its gradient and the loss temporaries.
    ``channels_last``: 4-D input and output, held in the channels-last layout
    (convolutions on the CPU run up to twice as fast on it, depthwise ones
    most), because the unit ran on such an input.
    """

    inp: Tuple[int, ...]
    out: Tuple[int, ...]
    step_bytes: int = 0
    channels_last: bool = False

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def nbytes(self, samples: int, fisher: bool) -> int:
        """Bytes of the whole cache: inputs, targets and (``fisher``) loss weights of ``samples`` samples."""
        per = math.prod(self.inp) + math.prod(self.out) * (2 if fisher else 1)
        return samples * per * FLOAT_BYTES


def _single_input(args: tuple) -> torch.Tensor:
    if len(args) != 1 or not isinstance(args[0], torch.Tensor):
        raise Unsupported("the unit does not take exactly one tensor")
    return args[0]


def _saved_bytes(unit: nn.Module, inp: torch.Tensor) -> int:
    """Bytes autograd saves for a backward pass through ``unit`` on ``inp`` (a tensor saved twice counts once)."""
    seen: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.data_ptr(), t.device)
        seen[key] = max(seen.get(key, 0), t.numel() * t.element_size())
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = unit(inp.detach().float().requires_grad_(True))
    del out
    return sum(seen.values())


def _runs_channels_last(unit: nn.Module, inp: torch.Tensor) -> bool:
    """Whether ``unit`` accepts a channels-last copy of the 4-D ``inp`` (a ``view`` inside may refuse it)."""
    try:
        unit(inp.contiguous(memory_format=torch.channels_last))
    except RuntimeError:
        return False
    return True


@torch.no_grad()
def probe_unit(fp_model: nn.Module, fp_unit: nn.Module, x: torch.Tensor, batch_size: int,
               device: torch.device, fisher: bool = False) -> CacheShape:
    """Run ``fp_model`` batch by batch until ``fp_unit`` runs once; return its shapes and step working set.

    Unsupported when the unit does not map one tensor to one tensor; NoData when
    it never runs on ``x``. Only one batch's activations are ever held.
    """
    seen = {}

    def hook(_m: nn.Module, args: tuple, out: object) -> None:
        inp = _single_input(args)
        if not isinstance(out, torch.Tensor):
            raise Unsupported("the unit does not return one tensor")
        if inp.dim() == 0 or out.dim() == 0 or inp.shape[0] != out.shape[0]:
            raise Unsupported("the unit's input and output do not share a batch dimension")
        seen["inp"], seen["out"] = inp.detach(), out.shape
        raise _Stop

    handle = fp_unit.register_forward_hook(hook)
    try:
        for xb in batches(x, batch_size, device):
            try:
                fp_model(xb)
            except _Stop:
                break
    finally:
        handle.remove()
    if "inp" not in seen:
        raise NoData
    inp, out_shape = seen["inp"], seen["out"]
    n = inp.shape[0]
    out_b = math.prod(out_shape) * FLOAT_BYTES
    # batch copies of x, y (and w), then output, its gradient and two loss temporaries
    step = _saved_bytes(fp_unit, inp) + inp.numel() * FLOAT_BYTES + out_b * (6 if fisher else 5)
    cl = inp.dim() == 4 and len(out_shape) == 4 and _runs_channels_last(fp_unit, inp)
    return CacheShape(tuple(inp.shape[1:]), tuple(out_shape[1:]), step * batch_size // max(n, 1), cl)


def check_cache_size(shape: CacheShape, samples: int, fisher: bool, limit_bytes: float, what: str) -> int:
    """The cache's size in bytes; ValueError naming ``what`` when the cache plus one step's working set
    is above ``limit_bytes`` (checked before anything is allocated)."""
    need = shape.nbytes(samples, fisher)
    if need + shape.step_bytes > limit_bytes:
        parts = "input + output" + (" + Fisher weights" if fisher else "")
        raise ValueError(
            f"the reconstruction cache of {what} needs {need / 2**20:.1f} MB ({samples} samples x ({parts})) "
            f"plus {shape.step_bytes / 2**20:.1f} MB for one optimisation step, above "
            f"max_cache_mb={limit_bytes / 2**20:g}; lower num_samples or raise max_cache_mb"
        )
    return need


def _check_batch(t: torch.Tensor, want: Tuple[int, ...], what: str) -> None:
    if tuple(t.shape[1:]) != want:
        raise Unsupported(f"the unit's {what} shape changes between batches ({tuple(t.shape[1:])} vs {want})")


@torch.no_grad()
def capture_inputs(model: nn.Module, unit: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device,
                   shape: CacheShape) -> torch.Tensor:
    """The input of ``unit`` for every sample of ``x``, running ``model`` (as it is now) up to the unit.

    The result is allocated once (``[N, *shape.inp]``, float32, in ``shape``'s layout) and filled batch by batch.
    """
    out = torch.empty((x.shape[0],) + shape.inp, dtype=torch.float32, device=device,
                      memory_format=shape.memory_format)
    filled = {"n": 0}

    def hook(_m: nn.Module, args: tuple) -> None:
        t = _single_input(args).detach()
        _check_batch(t, shape.inp, "input")
        n = filled["n"]
        if n + t.shape[0] > out.shape[0]:
            raise Unsupported("the unit ran more than once per calibration sample")
        out[n : n + t.shape[0]].copy_(t)
        filled["n"] = n + t.shape[0]
        raise _Stop

    handle = unit.register_forward_pre_hook(hook, prepend=True)
    try:
        for xb in batches(x, batch_size, device):
            before = filled["n"]
            try:
                model(xb)
            except _Stop:
                pass
            if filled["n"] != before + xb.shape[0]:
                raise Unsupported("the unit did not run once on every calibration sample")
    finally:
        handle.remove()
    return out


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
    shape: CacheShape,
    labels: Optional[torch.Tensor] = None,
    damping: float = 1.0,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The FP output of ``unit`` (and, with ``labels``, Fisher weights ``(|dL/dout| + damping)^2``).

    ``L`` is the summed cross-entropy of the FP model against ``labels``, so
    each sample's gradient does not depend on the batch it was computed in.
    Both results are allocated once at their final size (``[N, *shape.out]``).
    """
    n_all = x.shape[0]
    outs = torch.empty((n_all,) + shape.out, dtype=torch.float32, device=device, memory_format=shape.memory_format)
    grads = None if labels is None else torch.empty_like(outs)
    held = []
    pos = {"n": 0}

    def hook(_m: nn.Module, _a: tuple, out: object) -> object:
        if not isinstance(out, torch.Tensor):
            raise Unsupported("the unit does not return one tensor")
        _check_batch(out, shape.out, "output")
        n = pos["n"]
        if n + out.shape[0] > n_all:
            raise Unsupported("the unit ran more than once per calibration sample")
        outs[n : n + out.shape[0]].copy_(out.detach())
        pos["n"] = n + out.shape[0]
        if labels is None:
            raise _Stop
        live = out.detach().requires_grad_(True)
        held.append(live)
        return live

    handle = unit.register_forward_hook(hook)
    try:
        for i, xb in enumerate(batches(x, batch_size, device)):
            start = i * batch_size
            if labels is None:
                with torch.no_grad():
                    try:
                        fp_model(xb)
                    except _Stop:
                        pass
            else:
                with torch.enable_grad():
                    logits = fp_model(xb)
                    if not held:
                        raise Unsupported("the unit did not run once on every calibration sample")
                    lb = labels[start : start + xb.shape[0]]
                    loss = F.cross_entropy(logits, lb, reduction="sum")
                    (g,) = torch.autograd.grad(loss, held.pop())
                assert grads is not None
                torch.square(g.abs().add_(damping), out=grads[start : start + xb.shape[0]])
                del logits, loss, g
            if pos["n"] != start + xb.shape[0]:
                raise Unsupported("the unit did not run once on every calibration sample")
    finally:
        handle.remove()
    return outs, grads


def rec_loss(pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
             channel_dim: int = 1, of: Optional[int] = None) -> torch.Tensor:
    """BRECQ's reconstruction loss: squared error summed over channels, averaged over everything else.

    ``(pred - target)^2`` (times ``weight`` for the Fisher loss) is summed over
    ``channel_dim`` and averaged over the batch and every other position (the
    spatial ones of a convolution's ``[N, C, H, W]`` output, the tokens of a
    ``[N, T, C]`` one). This is the reduction of BRECQ's public code, for which
    its rounding weight ``lambda = 0.01`` is tuned; a per-sample sum over
    ``C x H x W`` would be ``H x W`` times larger. A 1-D output is averaged.

    ``of``: the number of samples the mean is over when ``pred`` holds only
    part of a batch (a rank's members of a global batch): the sum is divided
    by ``of`` times the positions, so each element's gradient is the one the
    whole batch's mean gives it (the same float factor).
    """
    d = (pred - target).square()
    if weight is not None:
        d = d * weight
    if d.dim() >= 2:
        d = d.sum(dim=channel_dim)
    if of is None or of == d.shape[0]:
        return d.mean()
    return d.sum() / (of * (d.numel() // max(d.shape[0], 1)))


@torch.no_grad()
def eval_loss(unit: nn.Module, data: UnitData, batch_size: int) -> float:
    """:func:`rec_loss` of ``unit`` over all cached samples (every sample weighs the same)."""
    total = 0.0
    n = len(data)
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        pred = unit(data.x[sl])
        w = None if data.w is None else data.w[sl]
        total += float(rec_loss(pred, data.y[sl], w, data.channel_dim)) * pred.shape[0]
    return total / n
