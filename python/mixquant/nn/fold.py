"""Fold batch normalisation into the convolution (or linear layer) that feeds it.

In eval mode ``bn(conv(x)) = conv'(x)`` with
``w' = w * gamma / sqrt(var + eps)`` (per output channel) and
``b' = (b - mean) * gamma / sqrt(var + eps) + beta``. Folding first means the
quantizer sees the weights that actually run (BRECQ does the same).

Which BN follows which layer is found from a ``torch.fx`` trace of the model
(exact: a BN whose only input is a layer's output, used nowhere else). When the
model cannot be traced, the fallback is the registration order of children
within each parent (``conv`` then ``bn`` as consecutive children, as in
``nn.Sequential`` and in torchvision's ``conv1, bn1, conv2, bn2``), checked by
channel count.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from .parametrized import materialize_weight

__all__ = ["fold_bn", "fold_bn_pairs", "find_bn_pairs", "check_fold_pairs", "apply_fold_structure"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _can_fold(layer: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(layer, _FOLDABLE) or not isinstance(bn, _BN):
        return False
    if not bn.track_running_stats or bn.running_mean is None:
        return False  # uses batch statistics even in eval mode
    if isinstance(layer, _TRANSPOSED) and layer.groups != 1:
        return False
    return _out_channels(layer) == bn.num_features


def _pairs_from_fx(model: nn.Module) -> List[Tuple[str, str]]:
    import torch.fx as fx

    graph = fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BN):
            continue
        prev = node.args[0] if node.args else None
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        if calls.get(prev.target) != 1 or calls.get(node.target) != 1:
            continue  # a shared module cannot absorb a BN
        if _can_fold(modules[prev.target], modules[node.target]):
            pairs.append((prev.target, node.target))
    return pairs


def _pairs_from_order(model: nn.Module) -> List[Tuple[str, str]]:
    pairs = []
    for parent_name, parent in model.named_modules():
        prefix = f"{parent_name}." if parent_name else ""
        prev_name, prev = None, None
        for name, child in parent.named_children():
            if prev is not None and _can_fold(prev, child):
                pairs.append((prefix + prev_name, prefix + name))
            prev_name, prev = name, child
    return pairs


def find_bn_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    """``(layer_fqn, bn_fqn)`` for every BN that can be folded into the layer before it."""
    try:
        return _pairs_from_fx(model)
    except Exception:  # untraceable model (data-dependent control flow, ...)
        return _pairs_from_order(model)


def _set_child(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent_name, _, leaf = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def check_fold_pairs(model: nn.Module, pairs: List[Tuple[str, str]]) -> None:
    """ValueError unless every ``(layer, bn)`` pair names, in ``model``, a layer and a batch norm that fold.

    Each name may appear once; the layer must be a conv/linear layer and the
    batch norm one with running statistics and the layer's channel count, as
    :func:`fold_bn_pairs` would have found them.
    """
    modules = dict(model.named_modules())
    seen = set()
    for layer_name, bn_name in pairs:
        for name in (layer_name, bn_name):
            if name in seen:
                raise ValueError(f"folded batch norms: {name!r} appears twice")
            seen.add(name)
        layer, bn = modules.get(layer_name), modules.get(bn_name)
        if layer is None or bn is None:
            raise ValueError(f"folded batch norms: the model has no module {layer_name if layer is None else bn_name!r}")
        if not _can_fold(layer, bn):
            raise ValueError(f"folded batch norms: {bn_name!r} ({type(bn).__name__}) is not a batch norm that "
                             f"folds into {layer_name!r} ({type(layer).__name__})")


def apply_fold_structure(model: nn.Module, pairs: List[Tuple[str, str]]) -> None:
    """Make ``model`` look folded without computing anything: BN → Identity, layers get a bias.

    Used when loading a quantized file, whose tensors already hold the folded
    values; the pairs are checked first (:func:`check_fold_pairs`).
    """
    check_fold_pairs(model, pairs)
    for layer_name, bn_name in pairs:
        layer = model.get_submodule(layer_name)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(_out_channels(layer), device=layer.weight.device, dtype=layer.weight.dtype))
        _set_child(model, bn_name, nn.Identity())


@torch.no_grad()
def _fold_one(layer: nn.Module, bn: nn.Module) -> None:
    w = layer.weight
    factor = (bn.weight.double() if bn.affine else torch.ones_like(bn.running_var, dtype=torch.float64))
    factor = factor / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = bn.bias.double() if bn.affine else torch.zeros_like(factor)
    axis = 1 if isinstance(layer, _TRANSPOSED) else 0
    shape = [1] * w.dim()
    shape[axis] = -1
    w.copy_((w.double() * factor.reshape(shape)).to(w.dtype))
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(factor)
    new_bias = ((bias - bn.running_mean.double()) * factor + shift).to(w.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias, requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(new_bias)


def fold_bn_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    """Fold every foldable BN of ``model`` in place; return the ``(layer, bn)`` pairs folded.

    Each folded BN is replaced by ``nn.Identity`` (same name). Eval-mode outputs
    are preserved up to float rounding.
    """
    pairs = find_bn_pairs(model)
    for layer_name, bn_name in pairs:
        layer = model.get_submodule(layer_name)
        materialize_weight(layer, layer_name)  # folding into a computed weight would change nothing
        _fold_one(layer, model.get_submodule(bn_name))
        _set_child(model, bn_name, nn.Identity())
    return pairs


def fold_bn(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Return ``model`` with batch norms folded into their preceding conv/linear layers.

    Args:
        model: any module; BNs not directly after a conv/linear layer (or in
            batch-statistics mode) are left as they are.
        inplace: fold ``model`` itself instead of a deep copy.

    The list of folded pairs is stored on the result as ``mixquant_folded_bn``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    target = model if inplace else copy.deepcopy(model)
    target.mixquant_folded_bn = fold_bn_pairs(target)
    return target
