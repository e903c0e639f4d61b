"""Reconstruction units: residual blocks found by structure, and single layers.

A module is a *residual block* (reconstructed as one unit by BRECQ) when

* its class, or a base class, was registered with :func:`register_block`; or
* it looks like a ResNet BasicBlock / Bottleneck: children ``conv1`` and
  ``conv2`` that are convolutions (``conv3``, ``bn*``, ``downsample`` /
  ``shortcut`` optional), the layout of torchvision's and the common CIFAR
  ResNets; or
* it looks like a MobileNetV2 inverted residual: a ``conv`` child that is an
  ``nn.Sequential`` and a ``use_res_connect`` attribute (torchvision's
  ``InvertedResidual``).

Everything else is walked into, and each quantized layer outside a block is a
unit of its own; so an unknown architecture still works, layer by layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Set, Type

import torch.nn as nn

__all__ = ["Unit", "register_block", "registered_blocks", "is_block", "build_units"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BLOCK_TYPES: List[Type[nn.Module]] = []


def register_block(cls: Type[nn.Module]) -> Type[nn.Module]:
    """Declare ``cls`` (and its subclasses) a reconstruction block; usable as a class decorator.

    Its ``forward`` must take one tensor and return one tensor.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_block expects an nn.Module subclass, got {cls!r}")
    if cls not in _BLOCK_TYPES:
        _BLOCK_TYPES.append(cls)
    return cls


def registered_blocks() -> List[Type[nn.Module]]:
    """The classes registered with :func:`register_block`."""
    return list(_BLOCK_TYPES)


def is_block(module: nn.Module) -> bool:
    """True when ``module`` is a residual block (registered, or recognised by its structure)."""
    if isinstance(module, tuple(_BLOCK_TYPES)):
        return True
    children = module._modules
    if isinstance(children.get("conv1"), _CONVS) and isinstance(children.get("conv2"), _CONVS):
        return True
    if isinstance(children.get("conv"), nn.Sequential) and hasattr(module, "use_res_connect"):
        return True
    return False


@dataclass
class Unit:
    """One reconstruction unit: a block or a single layer.

    Attributes:
        name: fully-qualified name of the module ("" for the model itself).
        module: the module.
        kind: "block" or "layer".
        layers: names of the quantized layers inside, in execution order.
    """

    name: str
    module: nn.Module
    kind: str
    layers: List[str]


def build_units(model: nn.Module, layer_names: Mapping[str, int], order: Optional[List[str]] = None) -> List[Unit]:
    """Split ``model`` into reconstruction units covering every layer in ``layer_names``.

    Units are sorted by the execution position of their first layer
    (``order``; definition order without it). A block holding no quantized
    layer is walked into instead.
    """
    wanted: Set[str] = set(layer_names)
    rank: Dict[str, int] = {n: i for i, n in enumerate(order or list(layer_names))}
    units: List[Unit] = []

    def layers_under(prefix: str, module: nn.Module) -> List[str]:
        found = []
        for sub, _ in module.named_modules(prefix=prefix):
            if sub in wanted:
                found.append(sub)
        return sorted(found, key=lambda n: rank.get(n, len(rank)))

    def walk(prefix: str, module: nn.Module) -> None:
        if prefix in wanted:
            units.append(Unit(prefix, module, "layer", [prefix]))
            return
        if prefix and is_block(module):
            inside = layers_under(prefix, module)
            if inside:
                units.append(Unit(prefix, module, "block", inside))
                return
        for name, child in module.named_children():
            walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", model)
    units.sort(key=lambda u: rank.get(u.layers[0], len(rank)))
    return units
