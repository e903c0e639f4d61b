"""Packed-weight runtime: quantized layers that keep their codes packed and dequantize in forward.

A packed layer is the same module object (same name, same hooks, still an
``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding`` / ... by ``isinstance``) whose
class is swapped for a subclass in which ``weight`` is a read-only property:
each access decodes the layer's codes with the native unpack-and-dequantize
kernel (:func:`mixquant.core.kernels.decode_packed`) into a fresh float32
tensor, so the module's own ``forward`` runs unchanged. What stays resident is

* ``weight_packed``: uint8, the codes at the layer's bit-width, LSB-first
  (``ceil(numel * bits / 8)`` bytes, the layout of :func:`mixquant.pack_bits`);
* ``weight_scale`` (float32) and ``weight_zero_point`` (int32), ``[1]`` or ``[C]``.

The decoded weight is ``(code - zero_point) * scale`` in float32, the formula
that produces the weights of an unpacked quantized model, so outputs are
bit-identical to it. The price is one decode per access (the weight of the
largest layer is the extra memory in flight); gradients do not flow into
packed weights (an inference runtime).

Fused Linear layers (``pack_layer(..., fused=True)``, ``load_quantized(...,
packed="fused")``): an ``nn.Linear`` whose input is one row (batch 1 x 1 token,
the decoding step of a language model) skips the decode and computes its
output straight from the codes with the fused kernel
(:func:`mixquant.core.kernels.packed_matvec`): each packed byte read once, no
float weight formed. That output is *not* bit-identical to the unpacked
model's: it is within the kernel's bound of the exact product (float32 partial
sums of at most 64 terms), where the unpacked model rounds every weight to
float32 and sums in BLAS's order; the two differ by a few float32 roundings
of the row's sum. Every other input (more rows, another dtype or device, an
input that needs a gradient, tracing) takes the decode path and stays
bit-identical.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple, Type

import torch
import torch.nn as nn

from ..core.backend import resolve_backend
from ..core.kernels import PackedLayout, decode_packed, matvec_packed, packed_layout
from ..core.tensors import check_bits, check_qparams

__all__ = ["PACKED_KEY", "PackedWeightMixin", "FusedMixin", "pack_layer", "packed_class", "is_packed_layer",
           "is_fused_layer", "packed_bytes"]

PACKED_KEY = "weight_packed"


class PackedWeightMixin:
    """Mixed in front of a layer's class by :func:`pack_layer`: ``weight`` is decoded on access."""

    mixquant_layout: PackedLayout
    mixquant_bits: int

    @property
    def weight(self) -> torch.Tensor:
        buffers = self._buffers
        packed, scale, zp = buffers[PACKED_KEY], buffers["weight_scale"], buffers["weight_zero_point"]
        flat = decode_packed(packed, self.mixquant_bits, self.mixquant_layout, scale, zp)
        return flat.view(self.mixquant_shape)

    def __setattr__(self, name: str, value: object) -> None:
        if name == "weight":  # before nn.Module's parameter registration gets to it
            raise AttributeError("the weight of a packed layer is read-only (it is decoded from its packed codes); "
                                 "load the model without packed=True to change weights")
        super().__setattr__(name, value)

    def __reduce_ex__(self, protocol):
        # The packed class is made at run time: pickle (and deepcopy) rebuild it from its base and mixin.
        cls = type(self)
        return _rebuild, (cls._mixquant_base, cls._mixquant_mixin), dict(self.__dict__)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return f"{base}, packed={self.mixquant_bits} bits" if base else f"packed={self.mixquant_bits} bits"


class FusedMixin(PackedWeightMixin):
    """A packed ``nn.Linear`` whose one-row inputs go through the fused matrix-vector kernel (module docstring)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        k = self.in_features
        # Tracing first: a traced input's sizes are tensors, and a fused call would leave the graph.
        if (not torch.jit.is_tracing() and not torch.jit.is_scripting() and not _compiling()
                and isinstance(input, torch.Tensor) and k > 0 and input.numel() == k and input.dim() >= 1
                and input.shape[-1] == k and input.dtype == torch.float32 and input.device.type == "cpu"
                and not (input.requires_grad and torch.is_grad_enabled())
                and resolve_backend(None) == "native"):
            buffers = self._buffers
            packed = buffers[PACKED_KEY]
            if packed.device.type == "cpu":
                y = matvec_packed(packed, self.mixquant_bits, self.out_features, k, k, buffers["weight_scale"],
                                  buffers["weight_zero_point"], input.reshape(1, k).contiguous())
                if self.bias is not None:
                    y = y + self.bias
                return y.view(*input.shape[:-1], self.out_features)
        return super().forward(input)


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def is_fused_layer(module: nn.Module) -> bool:
    """True when ``module`` is a packed Linear that takes one-row inputs through the fused kernel."""
    return isinstance(module, FusedMixin)


_CLASSES: Dict[Tuple[type, type], type] = {}


def packed_class(base: Type[nn.Module], mixin: type = PackedWeightMixin) -> type:
    """The subclass of ``base`` with ``mixin`` in front (made once per pair); ``mixin`` supplies ``weight``."""
    cls = _CLASSES.get((mixin, base))
    if cls is None:
        prefix = "Packed" if mixin is PackedWeightMixin else mixin.__name__.replace("Mixin", "")
        cls = type(f"{prefix}{base.__name__}", (mixin, base),
                   {"_mixquant_base": base, "_mixquant_mixin": mixin, "__module__": mixin.__module__})
        _CLASSES[(mixin, base)] = cls
    return cls


def _rebuild(base: type, mixin: type = PackedWeightMixin) -> nn.Module:
    return object.__new__(packed_class(base, mixin))


def is_packed_layer(module: nn.Module) -> bool:
    """True when ``module``'s weight is decoded from packed codes."""
    return isinstance(module, PackedWeightMixin)


def packed_bytes(module: nn.Module) -> int:
    """Bytes held by a packed layer's codes, scales and zero points."""
    return sum(module._buffers[k].numel() * module._buffers[k].element_size()
               for k in (PACKED_KEY, "weight_scale", "weight_zero_point"))


def pack_layer(layer: nn.Module, packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               bits: int, ch_axis: int, name: str = "layer", fused: bool = False) -> None:
    """Make ``layer`` a packed layer holding ``packed`` (uint8 codes of its weight's shape at ``bits``).

    With ``fused``, an ``nn.Linear`` that runs ``nn.Linear.forward`` itself (not
    a subclass with its own) becomes a fused layer (module docstring); any
    other layer is packed as without it.

    The ``weight`` parameter is removed (its memory is freed when nothing else
    holds it). Raises ValueError, leaving ``layer`` unchanged, when the codes,
    scales or zero points do not fit the weight, and for an ``nn.Embedding``
    with ``max_norm`` (which renormalises its weight in place, something a
    packed weight cannot do).
    """
    if isinstance(layer, torch.jit.ScriptModule):
        raise ValueError(f"layer {name!r} is TorchScript; packed weights need an eager module")
    if is_packed_layer(layer):
        raise ValueError(f"layer {name!r} is already packed")
    weight = layer._parameters.get("weight") if isinstance(layer, nn.Module) else None
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"layer {name!r} has no weight parameter to pack")
    if isinstance(layer, nn.Embedding) and layer.max_norm is not None:
        raise ValueError(f"layer {name!r}: an Embedding with max_norm changes its weight in forward; it cannot be packed")
    if weight.dtype != torch.float32:
        raise ValueError(f"layer {name!r}: packed layers decode to float32, the weight is {weight.dtype}")
    bits = check_bits(bits)
    shape = tuple(weight.shape)
    layout = packed_layout(shape, ch_axis, torch.as_tensor(scale).numel())
    need = (math.prod(shape) * bits + 7) // 8
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        raise ValueError(f"layer {name!r}: packed codes must be {need} uint8 bytes for {shape} at {bits} bits")
    s, z = check_qparams(scale, zero_point, torch.as_tensor(scale).numel(), 2**bits - 1)
    device = weight.device
    del layer._parameters["weight"]
    for key, value in ((PACKED_KEY, packed), ("weight_scale", s), ("weight_zero_point", z)):
        value = value.detach().to(device).contiguous()
        if key in layer._buffers:
            layer._buffers[key] = value
        else:
            layer.register_buffer(key, value)
    layer.mixquant_bits = bits
    layer.mixquant_ch_axis = int(ch_axis)
    layer.mixquant_shape = shape
    layer.mixquant_layout = layout
    fuse = fused and isinstance(layer, nn.Linear) and type(layer).forward is nn.Linear.forward and ch_axis == 0
    layer.__class__ = packed_class(type(layer), FusedMixin if fuse else PackedWeightMixin)
