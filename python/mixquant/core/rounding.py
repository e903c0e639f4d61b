"""The fused AdaRound step: soft weights, their gradient and an Adam update in one pass.

BRECQ optimises, for every weight of a reconstruction unit, a rounding variable
``V``; each iteration needs the soft-rounded weight, the gradient of the
reconstruction loss plus the rounding regulariser with respect to ``V``, and an
Adam update. Written with torch ops that is some forty small kernels per layer
per iteration; here it is one native pass over all the unit's layers
(``csrc/rounding_*.cpp``), with the reference path (:mod:`.reference`)
repeating autograd's and ``torch.optim.Adam``'s operations exactly, layer by
layer.

The state of a unit lives in one :class:`FlatRounding`: every per-element
tensor is a flat float32 buffer, the layers being consecutive segments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from . import reference
from .backend import native, resolve_backend, resolve_threads

__all__ = ["FlatRounding", "rounding_weight", "rounding_step"]


@dataclass
class FlatRounding:
    """Flat buffers of several weight tensors' rounding variables (one segment per tensor).

    ``V``, ``floor``, ``scale``, ``lo``, ``hi`` (the last three expanded to
    every element), the Adam moments ``exp_avg`` / ``exp_avg_sq`` and the
    soft weights ``w`` are 1-D float32 tensors of the same length and device
    (off the CPU, every call takes the reference path);
    ``shapes[i]`` and ``offsets[i]`` place segment ``i``; ``params[i]`` holds
    its (scale, lo, hi) as given, for the reference path; ``steps`` counts the
    Adam updates made.
    """

    V: torch.Tensor
    floor: torch.Tensor
    scale: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    w: torch.Tensor
    shapes: List[torch.Size]
    offsets: List[int]
    params: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    steps: int = 0

    @classmethod
    def build(cls, V: Sequence[torch.Tensor], floor: Sequence[torch.Tensor], scale: Sequence[torch.Tensor],
              lo: Sequence[torch.Tensor], hi: Sequence[torch.Tensor]) -> "FlatRounding":
        """Concatenate per-tensor ``V`` and ``floor`` with ``scale``/``lo``/``hi`` broadcast to each ``V``.

        ValueError when the lists differ in length, a tensor is not float32 or
        not on ``V[0]``'s device, or ``floor``/``scale``/``lo``/``hi`` do not
        match ``V``'s shape.
        """
        if not (len(V) == len(floor) == len(scale) == len(lo) == len(hi)) or not V:
            raise ValueError("V, floor, scale, lo and hi must be non-empty lists of the same length")
        flat = {k: [] for k in ("V", "floor", "scale", "lo", "hi")}
        shapes, offsets, params, off = [], [], [], 0
        device = V[0].device if isinstance(V[0], torch.Tensor) else None
        for i, (v, f, s, a, b) in enumerate(zip(V, floor, scale, lo, hi)):
            for name, t in (("V", v), ("floor", f), ("scale", s), ("lo", a), ("hi", b)):
                if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.device != device:
                    raise ValueError(f"{name}[{i}] must be a float32 tensor on {device}")
            if f.shape != v.shape:
                raise ValueError(f"floor[{i}] has shape {tuple(f.shape)}, V[{i}] {tuple(v.shape)}")
            try:
                parts = [t.detach().expand(v.shape) for t in (s, a, b)]
            except RuntimeError:
                raise ValueError(f"scale/lo/hi[{i}] do not broadcast to V[{i}]'s shape {tuple(v.shape)}") from None
            for name, t in zip(("V", "floor", "scale", "lo", "hi"), [v.detach(), f.detach(), *parts]):
                flat[name].append(t.reshape(-1))
            shapes.append(v.shape)
            offsets.append(off)
            params.append((s.detach(), a.detach(), b.detach()))
            off += v.numel()
        cat = {k: torch.cat(ts).contiguous() for k, ts in flat.items()}
        n = cat["V"].numel()
        z = dict(dtype=torch.float32, device=device)
        return cls(cat["V"], cat["floor"], cat["scale"], cat["lo"], cat["hi"], torch.zeros(n, **z), torch.zeros(n, **z),
                   torch.empty(n, **z), shapes, offsets, params)

    def segment(self, t: torch.Tensor, i: int) -> torch.Tensor:
        """Segment ``i`` of the flat tensor ``t`` as a view of its tensor's shape."""
        n = self.shapes[i].numel()
        return t[self.offsets[i] : self.offsets[i] + n].view(self.shapes[i])

    def __len__(self) -> int:
        return len(self.shapes)


def _np(t: torch.Tensor):
    return t.detach().numpy()


def _native(state: FlatRounding, backend: Optional[str]) -> bool:
    """The native kernels run on CPU buffers; any other device takes the reference path."""
    return resolve_backend(backend) == "native" and state.V.device.type == "cpu"


def rounding_weight(state: FlatRounding, *, backend: Optional[str] = None, num_threads: Optional[int] = None) -> None:
    """Write the soft-rounded weights of ``state.V`` into ``state.w``."""
    if _native(state, backend):
        nt = resolve_threads(num_threads)
        native().rounding_weight(_np(state.V), _np(state.floor), _np(state.scale), _np(state.lo), _np(state.hi),
                                 _np(state.w), nt)
        return
    with torch.no_grad():
        for i, (s, a, b) in enumerate(state.params):
            state.segment(state.w, i).copy_(
                reference.rounding_weight(state.segment(state.V, i), state.segment(state.floor, i), s, a, b))


def rounding_step(
    state: FlatRounding, grad_w: Optional[torch.Tensor], *, lr: float, betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8, coef: float = 0.0, beta: float = 2.0, backend: Optional[str] = None,
    num_threads: Optional[int] = None,
) -> None:
    """One AdaRound iteration after the backward pass, in place on ``state``.

    ``grad_w`` is dL/dw of the reconstruction loss for the flat soft weights
    (None: no gradient reached them, taken as zero). The gradient of
    ``L + coef * sum(1 - |2h - 1|**beta)`` with respect to ``V`` is formed,
    ``V`` and the Adam moments are updated as ``torch.optim.Adam(lr, betas,
    eps)`` would, and ``state.w`` receives the soft weights of the new ``V``.
    """
    if not (lr > 0 and eps > 0 and coef >= 0 and beta > 0 and 0 <= betas[0] < 1 and 0 <= betas[1] < 1):
        raise ValueError(f"invalid step constants: lr={lr}, betas={betas}, eps={eps}, coef={coef}, beta={beta}")
    g = torch.zeros_like(state.V) if grad_w is None else grad_w.detach().reshape(-1)
    if g.shape != state.V.shape or g.dtype != torch.float32:
        raise ValueError(f"grad_w must be float32 with {state.V.numel()} elements")
    state.steps += 1
    if _native(state, backend):
        beta1, beta2 = betas
        t = float(state.steps)
        nt = resolve_threads(num_threads)
        native().rounding_step(
            _np(state.V), _np(state.floor), _np(state.scale), _np(state.lo), _np(state.hi), _np(g.contiguous()),
            _np(state.exp_avg), _np(state.exp_avg_sq), _np(state.w), float(coef), float(beta), float(beta - 1),
            1 - beta1, beta2, 1 - beta2, -lr / (1 - beta1**t), (1 - beta2**t) ** 0.5, eps, nt)
        return
    with torch.no_grad():
        for i, (s, a, b) in enumerate(state.params):
            V, fl = state.segment(state.V, i), state.segment(state.floor, i)
            gV = reference.rounding_grad(V, fl, s, a, b, state.segment(g, i), coef, beta)
            reference.adam_update(V, gV, state.segment(state.exp_avg, i), state.segment(state.exp_avg_sq, i),
                                  state.steps, lr, betas, eps)
            state.segment(state.w, i).copy_(reference.rounding_weight(V, fl, s, a, b))
