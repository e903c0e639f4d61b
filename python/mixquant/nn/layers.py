"""Which modules of a model are quantized, found by fully-qualified name.

Quantizable types: ``Linear``, ``Conv*``, ``ConvTranspose*`` (output channels on
axis 1), ``Embedding`` (one scale per row, selected only with ``embeddings=True``)
and types added with :func:`register_quantizable` (for example GPT-2's
``Conv1D``, whose weight is stored ``[in, out]``: ``register_quantizable(Conv1D, ch_axis=1)``).

A weight shared by several modules (an LM head tied to the input embedding) is
one layer, found under the first module's name; the others are its aliases
(:func:`tied_weights`). Quantizing it changes every module that uses it, so it
is selected only when all of its quantizable modules are.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, Iterable, List, Optional, Type

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
    nn.Embedding: 0,
}

__all__ = ["find_layers", "register_quantizable", "channel_axis", "is_quantizable", "is_embedding", "tied_weights",
           "is_scripted", "submodule"]


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


def is_embedding(module: nn.Module) -> bool:
    """True for ``nn.Embedding`` (selected by :func:`find_layers` only with ``embeddings=True``)."""
    return isinstance(module, nn.Embedding)


def _own_weight(module: nn.Module) -> Optional[torch.Tensor]:
    """The ``weight`` Parameter registered on ``module`` (None for TorchScript modules, whose
    parameters are not Python objects that two modules could share)."""
    params = module._parameters
    return params.get("weight") if isinstance(params, dict) else None


def _weight_key(module: nn.Module) -> int:
    # The registered Parameter object: modules sharing it share the weight.
    weight = _own_weight(module)
    return id(weight) if weight is not None else id(module)


def find_layers(model: nn.Module, filter_fn: Optional[FilterFn] = None, *,
                embeddings: bool = False) -> "OrderedDict[str, nn.Module]":
    """Quantizable layers of ``model`` in definition order, keyed by fully-qualified name.

    ``filter_fn(module, fqn)`` returning False drops a layer; ``nn.Embedding``
    layers are kept only with ``embeddings=True``. Shared modules (the same
    object under two names) are listed once, under their first name, and so
    are modules sharing one weight Parameter (tied weights; see
    :func:`tied_weights`), which are dropped together when any of them is.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(embeddings, bool):
        raise TypeError(f"embeddings must be a bool, got {type(embeddings).__name__}")
    candidates = [(name, m) for name, m in model.named_modules() if is_quantizable(m)]
    by_weight: Dict[int, List[str]] = {}
    keep: Dict[str, bool] = {}
    for name, module in candidates:
        by_weight.setdefault(_weight_key(module), []).append(name)
        keep[name] = (embeddings or not is_embedding(module)) and (filter_fn is None or bool(filter_fn(module, name)))
    found: "OrderedDict[str, nn.Module]" = OrderedDict()
    for name, module in candidates:
        sharing = by_weight[_weight_key(module)]
        if sharing[0] == name and all(keep[n] for n in sharing):
            found[name] = module  # "" when the model itself is the layer
    return found


def tied_weights(model: nn.Module, names: Iterable[str]) -> Dict[str, List[str]]:
    """For each layer in ``names``, the other modules of ``model`` whose ``weight`` is the same Parameter.

    Layers without any are left out.
    """
    modules = dict(model.named_modules())
    users: Dict[int, List[str]] = {}
    for name, module in modules.items():
        if _own_weight(module) is not None:
            users.setdefault(_weight_key(module), []).append(name)
    out = {}
    for name in names:
        module = modules.get(name)
        if module is None or _own_weight(module) is None:
            continue
        others = [n for n in users.get(_weight_key(module), []) if n != name]
        if others:
            out[name] = others
    return out
