"""Which modules of a model are quantized, found by fully-qualified name."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, Optional, Type

import torch
import torch.nn as nn

FilterFn = Callable[[nn.Module, str], bool]

# Module type -> axis of its weight that holds the output channels.
_QUANTIZABLE: Dict[Type[nn.Module], int] = {
    nn.Linear: 0,
    nn.Conv1d: 0,
    nn.Conv2d: 0,
    nn.Conv3d: 0,
    nn.ConvTranspose1d: 1,
    nn.ConvTranspose2d: 1,
    nn.ConvTranspose3d: 1,
}

__all__ = ["find_layers", "register_quantizable", "channel_axis", "is_quantizable", "is_scripted", "submodule"]


def is_scripted(module: nn.Module) -> bool:
    """True for a TorchScript module (``torch.jit.script`` / ``torch.jit.load``)."""
    return isinstance(module, torch.jit.ScriptModule)


def submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)``, also for TorchScript models (which do not support it)."""
    if not is_scripted(model):
        return model.get_submodule(name)
    modules = dict(model.named_modules())
    if name not in modules:
        raise AttributeError(f"{type(model).__name__} has no submodule {name!r}")
    return modules[name]


def register_quantizable(cls: Type[nn.Module], ch_axis: int = 0) -> Type[nn.Module]:
    """Register a module class whose ``weight`` (2-D or more) should be quantized.

    ``ch_axis`` is the weight axis of the output channels. Usable as a decorator.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_quantizable expects an nn.Module subclass, got {cls!r}")
    if not isinstance(ch_axis, int) or ch_axis < 0:
        raise ValueError(f"ch_axis must be a non-negative int, got {ch_axis!r}")
    _QUANTIZABLE[cls] = ch_axis
    return cls


def _registered_axis(module: nn.Module) -> Optional[int]:
    for cls in type(module).__mro__:
        if cls in _QUANTIZABLE:
            return _QUANTIZABLE[cls]
    if is_scripted(module):  # a loaded TorchScript layer keeps only its class name
        name = getattr(module, "original_name", None)
        for cls, axis in _QUANTIZABLE.items():
            if cls.__name__ == name:
                return axis
    return None


def is_quantizable(module: nn.Module) -> bool:
    """True for a registered module type with a 2-D-or-more ``weight`` parameter."""
    if _registered_axis(module) is None:
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() >= 2 and weight.is_floating_point()


def channel_axis(module: nn.Module) -> int:
    """Axis of ``module.weight`` that holds output channels (1 for ConvTranspose, else 0)."""
    axis = _registered_axis(module)
    if axis is None:
        raise TypeError(f"{type(module).__name__} is not a quantizable module type")
    return axis


def find_layers(model: nn.Module, filter_fn: Optional[FilterFn] = None) -> "OrderedDict[str, nn.Module]":
    """Quantizable layers of ``model`` in definition order, keyed by fully-qualified name.

    ``filter_fn(module, fqn)`` returning False drops a layer. Shared modules
    (the same object under two names) are listed once, under their first name.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found: "OrderedDict[str, nn.Module]" = OrderedDict()
    for name, module in model.named_modules():
        if not is_quantizable(module):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        found[name] = module  # "" when the model itself is the layer
    return found
