"""Weights computed from other tensors (weight_norm, ``torch.nn.utils.parametrize``) made plain.

A parametrized layer recomputes ``weight`` from its parametrization's tensors
(``parametrizations.weight.original0/1``, or ``weight_g``/``weight_v`` with the
older hook-based ``torch.nn.utils.weight_norm``) on every access or forward,
so writing a quantized value into it changes nothing that runs. Before a layer
is quantized or has a batch norm folded into it, its weight is therefore
materialised: the parametrization is removed and ``weight`` becomes an ordinary
Parameter holding the value the layer computed (as BN folding replaces a BN).
"""

from __future__ import annotations

from typing import Iterable, List

import torch.nn as nn
from torch.nn.utils import parametrize

from .layers import is_scripted, submodule

__all__ = ["materialize_weight", "materialize_weights"]

# The hook-based reparametrizations of torch.nn.utils (deprecated, still found in old models).
_HOOK_REMOVERS = {"WeightNorm": "remove_weight_norm", "SpectralNorm": "remove_spectral_norm"}


def materialize_weight(layer: nn.Module, name: str = "layer") -> bool:
    """Make ``layer.weight`` a plain Parameter with its current value; True if something was removed.

    ValueError when the weight is still not a Parameter afterwards (computed
    some other way mixquant does not know how to undo).
    """
    if is_scripted(layer):  # TorchScript has neither parametrizations nor hooks; its weight is a Parameter
        return False
    changed = False
    if parametrize.is_parametrized(layer, "weight"):
        originals = list(layer.parametrizations["weight"].parameters())
        requires_grad = any(t.requires_grad for t in originals)
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        weight = layer._buffers.pop("weight", None)  # torch keeps a value without grad as a buffer
        if weight is not None:
            layer.weight = nn.Parameter(weight.detach(), requires_grad=requires_grad)
        changed = True
    for hook in list(layer._forward_pre_hooks.values()):
        remover = _HOOK_REMOVERS.get(type(hook).__name__)
        if remover is not None and getattr(hook, "name", None) == "weight":
            import torch.nn.utils as utils

            getattr(utils, remover)(layer, "weight")
            changed = True
    if not isinstance(layer._parameters.get("weight"), nn.Parameter):
        raise ValueError(
            f"layer {name!r}: its weight is computed ({type(layer.weight).__name__}, not a Parameter), so a "
            "quantized value could not be stored in it; make it a plain nn.Parameter first"
        )
    return changed


def materialize_weights(model: nn.Module, names: Iterable[str]) -> List[str]:
    """:func:`materialize_weight` for each named layer of ``model``; returns the names that changed."""
    return [name for name in names if materialize_weight(submodule(model, name), name)]
