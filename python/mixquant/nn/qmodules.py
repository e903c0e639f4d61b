"""Simulated-quantization state attached to ordinary PyTorch modules.

mixquant does not swap layer classes. A quantized layer stays the same
``nn.Conv2d`` / ``nn.Linear`` / ... object under the same name, with:

* ``weight`` holding the *dequantized* values ``(code - zero_point) * scale``
  (so the layer runs exactly as before, only with quantized weights);
* buffers ``weight_scale`` (float32, ``[C]`` or ``[1]``, or ``[C, G]`` for a
  group-wise quantizer) and ``weight_zero_point`` (int32, same shape), and
  plain attributes ``mixquant_bits``, ``mixquant_ch_axis`` and
  ``mixquant_group_size`` (None unless group-wise);
* optionally a child ``input_quantizer`` (:class:`ActQuantizer`) applied to the
  layer's input by a forward pre-hook.

A module whose output is quantized (a residual block) gets a child
``output_quantizer`` applied by a forward hook.

Keeping names and classes means a quantized model has the same module tree as
the float one, ``BitConfig.check_model`` still accepts it, and its
``state_dict`` keys are the float model's plus the quantization buffers. A
weight shared with other modules (tied) keeps its Parameter object, so they
all see the quantized values; only the layer named in the config carries the
buffers.
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn

from ..core.kernels import quantize_tensor
from ..core.limits import MAX_ACT_BITS, MIN_ACT_BITS

__all__ = [
    "ActQuantizer",
    "dequantize_weight",
    "set_quantized_weight",
    "grid_codes",
    "attach_input_quantizer",
    "attach_output_quantizer",
    "act_quantizers",
    "attach_activations",
    "set_act_mode",
    "is_quantized_layer",
    "param_shape",
    "expand_param",
]

INPUT_QUANTIZER = "input_quantizer"
OUTPUT_QUANTIZER = "output_quantizer"
ACT_MODES = ("off", "observe", "quant")


def param_shape(weight: torch.Tensor, ch_axis: int) -> Tuple[int, ...]:
    """Shape that broadcasts a ``[C]`` parameter along ``ch_axis`` of ``weight``."""
    shape = [1] * weight.dim()
    shape[ch_axis] = -1
    return tuple(shape)


def expand_param(param: torch.Tensor, like: torch.Tensor, ch_axis: int,
                 group_size: Optional[int] = None) -> torch.Tensor:
    """``param`` (float32) in a shape that broadcasts over ``like``: ``[C]``/``[1]`` along
    ``ch_axis``, or ``[C, G]`` group parameters expanded to ``like``'s full shape."""
    p = param.to(device=like.device, dtype=torch.float32)
    if group_size is None:
        return p.reshape(param_shape(like, ch_axis) if p.numel() > 1 else (1,) * like.dim())
    moved = like.movedim(ch_axis, 0).shape if like.dim() else (1,)
    c, k = moved[0], math.prod(moved[1:])
    full = p.reshape(c, -1).repeat_interleave(group_size, dim=1)[:, :k]
    return full.reshape(moved).movedim(0, ch_axis)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, ch_axis: int,
                      group_size: Optional[int] = None) -> torch.Tensor:
    """Float32 weight ``(codes - zero_point) * scale`` with ``[C]``/``[1]`` parameters along ``ch_axis``
    (or ``[C, G]`` group parameters, with ``group_size``).

    This one formula produces every stored quantized weight, at quantization
    time and when a file is loaded, which is what makes export → load
    bit-exact. It equals :func:`mixquant.dequantize_tensor`'s reference path.
    """
    s = expand_param(scale, codes, ch_axis, group_size)
    z = expand_param(zero_point, codes, ch_axis, group_size)
    return (codes.to(torch.float32) - z) * s


def set_quantized_weight(
    layer: nn.Module, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, ch_axis: int,
    group_size: Optional[int] = None,
) -> None:
    """Store quantized weights on ``layer``: dequantized ``weight`` plus its scale, zero point and bits.

    The ``weight`` Parameter object is kept (its data is replaced), so
    optimizers or tied references to it stay valid. Group parameters
    (``group_size``) are stored as ``[C, G]``. A TorchScript layer cannot
    take new buffers: there the scale and zero point are plain attributes
    (outside its ``state_dict``), which export and :func:`mixquant.quant_info` read the same way.
    """
    weight = layer.weight
    if tuple(codes.shape) != tuple(weight.shape):
        raise ValueError(f"codes have shape {tuple(codes.shape)}, the weight {tuple(weight.shape)}")
    w_hat = dequantize_weight(codes, scale, zero_point, ch_axis, group_size)
    with torch.no_grad():
        weight.data = w_hat.to(device=weight.device, dtype=weight.dtype)
    shape = (-1,) if group_size is None else (weight.shape[ch_axis] if weight.dim() else 1, -1)
    scale = scale.detach().to(device=weight.device, dtype=torch.float32).reshape(shape).clone()
    zero_point = zero_point.detach().to(device=weight.device, dtype=torch.int32).reshape(shape).clone()
    for name, value in (("weight_scale", scale), ("weight_zero_point", zero_point)):
        if isinstance(layer, torch.jit.ScriptModule):
            setattr(layer, name, value)
        elif name in layer._buffers:
            layer._buffers[name] = value
        else:
            layer.register_buffer(name, value)
    layer.mixquant_bits = int(bits)
    layer.mixquant_ch_axis = int(ch_axis)
    layer.mixquant_group_size = None if group_size is None else int(group_size)


def grid_codes(layer: nn.Module) -> Optional[torch.Tensor]:
    """The integer codes (int64) of a quantized layer that reproduce its stored ``weight`` exactly, or None.

    A float32 (or float64) weight holds its grid values exactly and rounding
    recovers the codes. A float16/bfloat16 weight holds them rounded to its
    dtype, which can move a value by up to a grid step at the widest grids
    :func:`mixquant.nn.precision.max_bits_for` allows, so a code whose
    dequantized value does not reproduce the weight is replaced by the
    neighbour that does. None means the weight is not (or no longer) on its grid.
    """
    weight = layer.weight.detach()
    scale, zp = layer.weight_scale.detach().cpu(), layer.weight_zero_point.detach().cpu()
    bits, axis = layer.mixquant_bits, layer.mixquant_ch_axis
    gs = getattr(layer, "mixquant_group_size", None)
    stored = weight.cpu()
    codes = quantize_tensor(stored.float(), scale, zp, bits, ch_axis=axis, group_size=gs).to(torch.int64)

    def fits(c: torch.Tensor) -> torch.Tensor:
        return dequantize_weight(c, scale, zp, axis, gs).to(stored.dtype) == stored

    ok = fits(codes)
    if bool(ok.all()):
        return codes
    if stored.dtype in (torch.float32, torch.float64):
        return None
    for step in (-1, 1):
        other = (codes + step).clamp(0, 2**bits - 1)
        better = ~ok & fits(other)
        codes = torch.where(better, other, codes)
        ok |= better
    return codes if bool(ok.all()) else None


def is_quantized_layer(module: nn.Module) -> bool:
    """True when ``module`` carries quantized weights (see :func:`set_quantized_weight`)."""
    if isinstance(module, torch.jit.ScriptModule):
        return hasattr(module, "mixquant_bits") and isinstance(getattr(module, "weight_scale", None), torch.Tensor)
    return hasattr(module, "mixquant_bits") and "weight_scale" in module._buffers


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    # Straight-through rounding: forward round(x), backward identity.
    return x + (torch.round(x) - x).detach()


class ActQuantizer(nn.Module):
    """Per-tensor asymmetric fake quantizer for activations, with a learnable step size.

    ``forward`` depends on :attr:`mode`:

    * ``"off"``: identity;
    * ``"observe"``: identity, recording the running min and max of what passes
      (a batch holding NaN/Inf is not recorded but sets :attr:`saw_nonfinite`);
    * ``"quant"``: ``(clamp(round(x / scale) + zero_point, 0, 2**bits - 1) - zero_point) * scale``
      with round half to even. When gradients are on, rounding is
      straight-through so ``scale`` learns LSQ-style (the zero point stays fixed).

    Args:
        bits: activation bit-width (``MIN_ACT_BITS..MAX_ACT_BITS``).
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_ACT_BITS <= bits <= MAX_ACT_BITS:
            raise ValueError(f"activation bits must be an int in {MIN_ACT_BITS}..{MAX_ACT_BITS}, got {bits!r}")
        self.bits = int(bits)
        self.qmax = float(2**bits - 1)
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(()))
        # Observer state only: not part of the state_dict (nor of exported files).
        self.register_buffer("min_val", torch.tensor(math.inf), persistent=False)
        self.register_buffer("max_val", torch.tensor(-math.inf), persistent=False)
        self.mode = "quant"
        self.saw_nonfinite = False  # set in "observe" mode by a batch holding NaN/Inf

    def set_mode(self, mode: str) -> None:
        """Switch between ``"off"``, ``"observe"`` and ``"quant"``."""
        if mode not in ACT_MODES:
            raise ValueError(f"mode must be one of {ACT_MODES}, got {mode!r}")
        if mode == "observe":
            self.saw_nonfinite = False
        self.mode = mode

    @torch.no_grad()
    def init_from_range(self) -> None:
        """Set scale and zero point from the observed range (zero always representable)."""
        if not torch.isfinite(self.min_val) or not torch.isfinite(self.max_val):
            raise RuntimeError("ActQuantizer saw no data; run calibration batches in 'observe' mode first")
        lo = torch.clamp(self.min_val, max=0.0).double()
        hi = torch.clamp(self.max_val, min=0.0).double()
        width = float(hi - lo)
        scale = width / self.qmax if width > 0 else 1.0
        zp = min(max(round(-float(lo) / scale), 0.0), self.qmax)
        self.scale.data.fill_(scale)
        self.zero_point.fill_(zp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            with torch.no_grad():
                d = x.detach()
                lo, hi = d.min(), d.max()  # NaN propagates through both
                if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
                    self.saw_nonfinite = True  # the range stays as it was; the caller reports it
                    return x
                self.min_val.copy_(torch.minimum(self.min_val, lo.to(self.min_val)))
                self.max_val.copy_(torch.maximum(self.max_val, hi.to(self.max_val)))
            return x
        scale = self.scale
        if torch.is_grad_enabled() and (scale.requires_grad or x.requires_grad):
            q = torch.clamp(_round_ste(x / scale) + self.zero_point, 0.0, self.qmax)
        else:
            q = torch.clamp(torch.round(x / scale) + self.zero_point, 0.0, self.qmax)
        return (q - self.zero_point) * scale

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}, mode={self.mode}"


def _input_quant_hook(module: nn.Module, args: tuple) -> tuple:
    quantizer = module._modules[INPUT_QUANTIZER]
    if not args or not isinstance(args[0], torch.Tensor):
        return args
    return (quantizer(args[0]),) + tuple(args[1:])


def _output_quant_hook(module: nn.Module, args: tuple, output: object) -> object:
    if isinstance(output, torch.Tensor):
        return module._modules[OUTPUT_QUANTIZER](output)
    return output


def _attach(module: nn.Module, attr: str, bits: int, name: str, register_hook) -> ActQuantizer:
    if hasattr(module, attr):
        raise ValueError(f"{name!r} already has an attribute {attr!r} (is the model already quantized?)")
    quantizer = ActQuantizer(bits)
    p = next(module.parameters(), None)
    if p is not None:
        quantizer.to(p.device)
    module.add_module(attr, quantizer)
    register_hook()
    return quantizer


def attach_input_quantizer(layer: nn.Module, bits: int, name: str = "layer") -> ActQuantizer:
    """Give ``layer`` an ``input_quantizer`` child applied to its first input by a pre-hook."""
    return _attach(layer, INPUT_QUANTIZER, bits, name, lambda: layer.register_forward_pre_hook(_input_quant_hook))


def attach_output_quantizer(module: nn.Module, bits: int, name: str = "module") -> ActQuantizer:
    """Give ``module`` an ``output_quantizer`` child applied to its tensor output by a forward hook."""
    return _attach(module, OUTPUT_QUANTIZER, bits, name, lambda: module.register_forward_hook(_output_quant_hook))


def attach_activations(model: nn.Module, inputs: Dict[str, int], outputs: Dict[str, int]) -> None:
    """Attach input quantizers (layer fqn -> bits) and output quantizers (module fqn -> bits)."""
    for name, bits in inputs.items():
        attach_input_quantizer(model.get_submodule(name), bits, name)
    for name, bits in outputs.items():
        attach_output_quantizer(model.get_submodule(name), bits, name)


def act_quantizers(module: nn.Module) -> Iterator[Tuple[str, ActQuantizer]]:
    """All :class:`ActQuantizer` children of ``module`` (recursively), with their names."""
    for name, m in module.named_modules():
        if isinstance(m, ActQuantizer):
            yield name, m


def set_act_mode(module: nn.Module, mode: str) -> None:
    """Set the mode of every activation quantizer under ``module``."""
    for _, q in act_quantizers(module):
        q.set_mode(mode)
