"""AdaRound: learn, per weight, whether to round down or up (Nagel et al. 2020, as used by BRECQ).

With ``s`` the scale and ``z`` the zero point, a weight ``w`` is stored as
``s * (clamp(floor(w/s) + h + z, 0, 2^b - 1) - z)`` where ``h`` is

* during optimisation, the rectified sigmoid ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``
  with ``gamma = -0.1``, ``zeta = 1.1``; ``V`` starts where ``h(V) = frac(w/s)``
  (so the soft weight equals the float weight);
* at the end, hard: 1 where ``V >= 0``, else 0.

The regulariser ``sum(1 - |2 h(V) - 1|^beta)`` pushes every ``h`` to 0 or 1.

While a layer is being optimised its ``weight`` Parameter is taken off the
module and a forward pre-hook puts the soft-quantized tensor in its place, so
any layer type whose forward reads ``self.weight`` works unchanged.

:class:`UnitRounding` optimises the roundings of a unit's layers together with
the fused step of :mod:`mixquant.core.rounding`: the soft weights are one flat
leaf tensor, autograd only differentiates the unit's forward pass, and the
gradient with respect to ``V`` (regulariser included) and the Adam update are
one native pass, the same arithmetic as autograd plus ``torch.optim.Adam``
(bit for bit on the reference backend).
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn

from ..core.limits import ADAROUND_GAMMA as GAMMA
from ..core.limits import ADAROUND_ZETA as ZETA
from ..core.rounding import FlatRounding, rounding_step, rounding_weight
from ..nn import qmodules

__all__ = ["AdaRound", "UnitRounding", "LinearTempDecay", "GAMMA", "ZETA"]


class AdaRound(nn.Module):
    """Learnable rounding of one weight tensor.

    Args:
        weight: the float weight.
        scale, zero_point: ``[C]`` or ``[1]`` quantization parameters along ``ch_axis``,
            or ``[C, G]`` group parameters with ``group_size``.
        bits: weight bit-width.
        ch_axis: weight axis of the output channels.
        group_size: the group size of group parameters (None otherwise).

    ``mode`` selects the rounding used by :meth:`forward`: "soft" (learned,
    differentiable), "hard" (V >= 0), "nearest" (round to nearest, for the
    baseline loss) or "external" (the tensor ``external()`` returns: a
    :class:`UnitRounding` in charge).
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, ch_axis: int,
                 group_size: Optional[int] = None) -> None:
        super().__init__()
        w = weight.detach().float()
        s = qmodules.expand_param(scale.detach(), w, ch_axis, group_size)
        z = qmodules.expand_param(zero_point.detach(), w, ch_axis, group_size)
        ws = w / s
        floor = torch.floor(ws)
        frac = ws - floor
        # h(V) = frac  <=>  sigmoid(V) = (frac - gamma) / (zeta - gamma)
        p = (frac - GAMMA) / (ZETA - GAMMA)
        self.V = nn.Parameter(torch.log(p) - torch.log1p(-p))
        qmax = float(2**bits - 1)
        self.register_buffer("floor", floor)
        self.register_buffer("scale", s)
        self.register_buffer("lo", -z)  # clamp(floor + h + z, 0, qmax) - z == clamp(floor + h, -z, qmax - z)
        self.register_buffer("hi", qmax - z)
        self.register_buffer("nearest", (torch.round(ws) - floor))
        self.zero_point = zero_point.detach().reshape(-1).to(torch.int32)
        self.scale_flat = scale.detach().reshape(-1).to(torch.float32)
        self.bits = int(bits)
        self.ch_axis = int(ch_axis)
        self.group_size = None if group_size is None else int(group_size)
        self.mode = "soft"
        self.external: Optional[Callable[[], torch.Tensor]] = None
        self._h: Optional[Tuple[torch.Tensor, int]] = None

    def h(self) -> torch.Tensor:
        """The soft rounding offsets ``h(V)`` in [0, 1]."""
        return torch.clamp(torch.sigmoid(self.V) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def offsets(self) -> torch.Tensor:
        if self.mode == "soft":
            h = self.h()
            # reused by regularizer() in the same step, while V is unchanged
            self._h = (h, self.V._version) if torch.is_grad_enabled() else None
            return h
        if self.mode == "hard":
            return (self.V >= 0).to(self.floor.dtype)
        return self.nearest

    def forward(self) -> torch.Tensor:
        """The weight under the current rounding mode."""
        if self.mode == "external":
            assert self.external is not None
            return self.external()
        return self.scale * torch.clamp(self.floor + self.offsets(), self.lo, self.hi)

    def regularizer(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2 h(V) - 1|^beta)``: zero when every offset is 0 or 1.

        Reuses ``h(V)`` from this step's forward pass when there was one (one
        node for both uses, as the fused step's gradient assumes).
        """
        cached, self._h = self._h, None
        h = cached[0] if cached is not None and cached[1] == self.V._version else self.h()
        return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()

    @torch.no_grad()
    def hard_fraction(self, tol: float = 1e-3) -> float:
        """Fraction of soft offsets already within ``tol`` of 0 or 1."""
        h = self.h()
        return float(((h <= tol) | (h >= 1 - tol)).float().mean())

    @torch.no_grad()
    def codes(self, mode: str = "hard") -> torch.Tensor:
        """Integer codes in [0, 2^bits - 1] under hard (or nearest) rounding, int32."""
        offs = (self.V >= 0).to(self.floor.dtype) if mode == "hard" else self.nearest
        q = torch.clamp(self.floor + offs, self.lo, self.hi) - self.lo  # + zero point
        return q.to(torch.int32)


def _soft_weight_hook(module: nn.Module, args: tuple) -> None:
    # Plain instance attribute (the Parameter was removed), set without nn.Module.__setattr__'s checks.
    module.__dict__["weight"] = module._modules["adaround"].forward()


def attach(layer: nn.Module, rounding: AdaRound) -> nn.Parameter:
    """Put ``rounding`` in charge of ``layer.weight``; return the removed Parameter (for :func:`detach`)."""
    weight = layer._parameters.pop("weight")
    layer.add_module("adaround", rounding)
    layer.weight = rounding().detach()  # so code reading .weight outside forward still finds a tensor
    layer._mixquant_adaround_hook = layer.register_forward_pre_hook(_soft_weight_hook, prepend=True)
    return weight


def detach(layer: nn.Module, weight: nn.Parameter) -> AdaRound:
    """Undo :func:`attach`: the original Parameter goes back (values unchanged); return the AdaRound module."""
    rounding = layer._modules.pop("adaround")
    layer._mixquant_adaround_hook.remove()
    del layer._mixquant_adaround_hook
    del layer.weight
    layer.weight = weight
    return rounding


class UnitRounding:
    """The roundings of one unit's layers, optimised together by the fused step.

    While it is active every layer's :class:`AdaRound` is in "external" mode
    and reads its soft weight from ``self.w``, one flat float32 leaf tensor
    (a view per layer, so autograd gathers the gradients of all layers in
    ``self.w.grad``). After the backward pass, :meth:`step` turns that
    gradient into the Adam update of every ``V`` and refreshes ``w``;
    :meth:`finish` copies the learned ``V`` back and leaves "external" mode.
    """

    def __init__(self, roundings: List[AdaRound], lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 backend: Optional[str] = None) -> None:
        self.roundings = list(roundings)
        self.lr, self.betas, self.eps, self.backend = lr, tuple(betas), eps, backend
        self.state = FlatRounding.build([r.V.detach() for r in self.roundings], [r.floor for r in self.roundings],
                                        [r.scale for r in self.roundings], [r.lo for r in self.roundings],
                                        [r.hi for r in self.roundings])
        rounding_weight(self.state, backend=backend)
        self.w = self.state.w.requires_grad_(True)
        for i, r in enumerate(self.roundings):
            r.mode = "external"
            r.external = lambda i=i: self.state.segment(self.w, i)

    def step(self, coef: float, beta: float) -> None:
        """Apply ``self.w.grad`` (the reconstruction loss's) plus ``coef`` times the regulariser's gradient."""
        rounding_step(self.state, self.w.grad, lr=self.lr, betas=self.betas, eps=self.eps, coef=coef, beta=beta,
                      backend=self.backend)
        self.w.grad = None

    def finish(self) -> None:
        """Copy the learned ``V`` into the layers' :class:`AdaRound` modules and put them back in "soft" mode."""
        with torch.no_grad():
            for i, r in enumerate(self.roundings):
                r.V.copy_(self.state.segment(self.state.V, i))
                r.mode, r.external = "soft", None


class LinearTempDecay:
    """The annealed exponent ``beta`` of the regulariser (BRECQ's schedule).

    Constant ``start`` (and no regulariser) for the first ``warmup`` fraction of
    ``total`` iterations, then linear from ``start`` down to ``end``.
    """

    def __init__(self, total: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> None:
        self.total = int(total)
        self.warm_iters = int(math.floor(warmup * total))
        self.start = float(start)
        self.end = float(end)

    def in_warmup(self, t: int) -> bool:
        return t < self.warm_iters

    def __call__(self, t: int) -> float:
        if t < self.warm_iters:
            return self.start
        rel = (t - self.warm_iters) / max(1, self.total - self.warm_iters)
        return self.end + (self.start - self.end) * max(0.0, 1.0 - rel)

