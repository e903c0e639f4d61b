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
"""

from __future__ import annotations

import math
from typing import Dict, Tuple, Type

import torch
import torch.nn as nn

from ..core.kernels import PackedLayout, decode_packed, packed_layout
from ..core.tensors import check_bits, check_qparams

__all__ = ["PACKED_KEY", "PackedWeightMixin", "pack_layer", "packed_class", "is_packed_layer", "packed_bytes"]

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
        # The packed class is made at run time: pickle (and deepcopy) rebuild it from its base.
        return _rebuild, (type(self)._mixquant_base,), dict(self.__dict__)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return f"{base}, packed={self.mixquant_bits} bits" if base else f"packed={self.mixquant_bits} bits"


_CLASSES: Dict[Tuple[type, type], type] = {}


def packed_class(base: Type[nn.Module], mixin: type = PackedWeightMixin) -> type:
    """The subclass of ``base`` with ``mixin`` in front (made once per pair); ``mixin`` supplies ``weight``."""
    cls = _CLASSES.get((mixin, base))
    if cls is None:
        prefix = "Packed" if mixin is PackedWeightMixin else mixin.__name__.replace("Mixin", "")
        cls = type(f"{prefix}{base.__name__}", (mixin, base), {"_mixquant_base": base, "__module__": mixin.__module__})
        _CLASSES[(mixin, base)] = cls
    return cls


def _rebuild(base: type) -> nn.Module:
    return object.__new__(packed_class(base))


def is_packed_layer(module: nn.Module) -> bool:
    """True when ``module``'s weight is decoded from packed codes."""
    return isinstance(module, PackedWeightMixin)


def packed_bytes(module: nn.Module) -> int:
    """Bytes held by a packed layer's codes, scales and zero points."""
    return sum(module._buffers[k].numel() * module._buffers[k].element_size()
               for k in (PACKED_KEY, "weight_scale", "weight_zero_point"))


def pack_layer(layer: nn.Module, packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               bits: int, ch_axis: int, name: str = "layer") -> None:
    """Make ``layer`` a packed layer holding ``packed`` (uint8 codes of its weight's shape at ``bits``).

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
    layer.__class__ = packed_class(type(layer))
