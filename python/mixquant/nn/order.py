"""The order in which a model runs its layers, and its first and last quantizable layer."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .calib import eval_mode
from .layers import FilterFn, find_layers, is_scripted

__all__ = ["execution_order", "first_last_layers"]


def _ran(model: nn.Module, names: List[str], sample: Any) -> List[str]:
    """The layers of ``names`` that run on ``sample``, in the order they first run."""
    modules = dict(model.named_modules())
    seen: Dict[str, int] = {}
    handles = []
    for name in names:
        def hook(_m: nn.Module, _a: tuple, name: str = name) -> None:
            seen.setdefault(name, len(seen))
        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        with torch.no_grad(), eval_mode(model):
            model(sample.to(device) if isinstance(sample, torch.Tensor) else sample)
    finally:
        for h in handles:
            h.remove()
    return sorted(seen, key=seen.__getitem__)


def execution_order(model: nn.Module, names: List[str], sample: Optional[Any]) -> List[str]:
    """``names`` sorted by when each layer first runs on ``sample``; layers that never run keep their order at the end.

    Without a sample, definition order is kept.
    """
    if sample is None:
        return list(names)
    ran = _ran(model, names, sample)
    done = set(ran)
    return ran + [n for n in names if n not in done]


def first_last_layers(model: nn.Module, example_input: Any, *, filter_fn: Optional[FilterFn] = None
                      ) -> Tuple[str, str]:
    """Names of the first and the last quantizable layer that run on ``example_input``.

    The model runs once on ``example_input`` (a batch it accepts, e.g.
    ``torch.randn(1, 3, 224, 224)``; without gradients, in eval mode, its mode
    restored after), so the answer follows ``forward``, not the order in which
    the layers were defined. ``filter_fn`` is :func:`mixquant.search`'s layer filter.

    Raises:
        ValueError: no quantizable layer ran on ``example_input``, or ``model``
            is TorchScript (its layers cannot be hooked; name them in ``keep=`` yourself).
    """
    if is_scripted(model):
        raise ValueError("the execution order of a TorchScript model cannot be observed; name its first and last "
                         "layers in keep= yourself")
    if example_input is None:
        raise ValueError("first_last_layers needs an example input to run the model on")
    ran = _ran(model, list(find_layers(model, filter_fn)), example_input)
    if not ran:
        raise ValueError(f"no quantizable layer of {type(model).__name__} ran on the example input")
    return ran[0], ran[-1]
