"""``mixquant.search`` and ``mixquant.uniform``: per-layer weight bit-widths for a model.

The search measures every quantizable layer's roundoff error at each
candidate bit-width (:mod:`mixquant.allocation.tables`) and picks the bits with
the QEM or the budget rule (:mod:`mixquant.allocation.rules`); the result is a
:class:`~mixquant.BitConfig`.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Mapping, Optional

import numpy as np
import torch.nn as nn

from ..allocation.bitconfig import BitConfig
from ..allocation.rules import DEFAULT_OBJECTIVE, OBJECTIVES, QEM_REFERENCES, budget_bits, qem_bits
from ..allocation.tables import error_tables, table_dict
from ..core.limits import DEFAULT_CANDIDATES, DEFAULT_P
from ..core.spec import QuantizerSpec
from ..core.tensors import check_bit_list, check_bits
from ..nn.layers import FilterFn, channel_axis, find_layers
from ..nn.order import first_last_layers

__all__ = ["search", "uniform", "keep_first_last", "FIRST_LAST_BITS"]

#: Bits of the first and last layer when they are pinned (the common practice BRECQ's code follows).
FIRST_LAST_BITS = 8


def keep_first_last(model: nn.Module, example_input: Any, bits: int = FIRST_LAST_BITS, *,
                    filter_fn: Optional[FilterFn] = None) -> Dict[str, int]:
    """``{first layer: bits, last layer: bits}``, to pass as ``keep=`` to :func:`search` or :func:`uniform`.

    The first and last quantizable layers are found in execution order by
    running ``model`` once on ``example_input`` (:func:`mixquant.first_last_layers`)::

        config = mixquant.search(model, avg_bits=4, keep=mixquant.keep_first_last(model, x[:1]))

    A model with one quantizable layer gives a one-entry dict.
    """
    bits = check_bits(bits, "bits")
    first, last = first_last_layers(model, example_input, filter_fn=filter_fn)
    return {first: bits, last: bits}


def _check_keep(keep: Optional[Mapping[str, int]], layers: Mapping[str, nn.Module]) -> Dict[str, int]:
    if keep is None:
        return {}
    if not isinstance(keep, Mapping):
        raise TypeError(f"keep must be a dict {{layer name: bits}}, got {type(keep).__name__}")
    out = {}
    for name, bits in keep.items():
        if name not in layers:
            known = ", ".join(list(layers)[:8])
            raise ValueError(f"keep names layer {name!r}, which is not a quantizable layer of the model "
                             f"(known: {known}{', ...' if len(layers) > 8 else ''})")
        out[name] = check_bits(bits, f"keep[{name!r}]")
    return out


def _model_layers(model: nn.Module, filter_fn: Optional[FilterFn]) -> "Dict[str, nn.Module]":
    layers = find_layers(model, filter_fn)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no quantizable layer (Linear, Conv*, ConvTranspose* or a type "
            "added with mixquant.register_quantizable) left after filter_fn"
        )
    return layers


def _groups(module: nn.Module, per_channel: bool) -> int:
    return int(module.weight.shape[channel_axis(module)]) if per_channel else 1


def _config(layers, chosen, tables, spec: QuantizerSpec, candidates, rule) -> BitConfig:
    return BitConfig(
        bits={name: int(chosen[name]) for name in layers},
        shapes={name: tuple(int(s) for s in m.weight.shape) for name, m in layers.items()},
        groups={name: _groups(m, spec.per_channel) for name, m in layers.items()},
        per_channel=spec.per_channel,
        symmetric=spec.symmetric,
        clip=spec.clip,
        p=spec.p,
        candidates=list(candidates),
        rule=rule,
        errors={name: table_dict(t) for name, t in tables.items()},
    )


def _keep_note(rule: dict, keep: Mapping[str, int]) -> dict:
    if keep:
        rule["keep"] = ",".join(f"{k}={v}" for k, v in keep.items())
    return rule


def search(
    model: nn.Module,
    bits: Iterable[int] = DEFAULT_CANDIDATES,
    *,
    qem: Optional[float] = None,
    ref_bits: int = 8,
    qem_reference: str = "layer",
    avg_bits: Optional[float] = None,
    max_bytes: Optional[int] = None,
    objective: str = DEFAULT_OBJECTIVE,
    per_channel: bool = True,
    symmetric: bool = False,
    clip: str = "minmax",
    p: float = DEFAULT_P,
    keep: Optional[Mapping[str, int]] = None,
    filter_fn: Optional[FilterFn] = None,
    backend: Optional[str] = None,
    num_threads: Optional[int] = None,
    progress: bool = False,
) -> BitConfig:
    """Find a weight bit-width for every quantizable layer of ``model``.

    Give exactly one of ``qem`` (threshold rule), ``avg_bits`` (parameter-weighted
    average bit-width budget) or ``max_bytes`` (storage budget, see
    :attr:`BitConfig.size_bytes`). ``bits`` are the candidates; ``keep`` pins
    layers (e.g. ``{"conv1": 8, "fc": 8}``) and they count toward the budget;
    ``filter_fn(module, fqn)`` leaves layers out entirely. ``objective`` is the
    per-layer error the budget rule sums: ``"norm"`` (error / weight energy,
    1/SQNR), ``"mse"`` (per-layer mean squared error) or ``"sse"`` (sum of squared
    error; lets large layers dominate). The result is deterministic.
    """
    candidates = check_bit_list(bits)
    given = [k for k, v in (("qem", qem), ("avg_bits", avg_bits), ("max_bytes", max_bytes)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of qem, avg_bits, max_bytes (got {given or 'none'})")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if qem_reference not in QEM_REFERENCES:
        raise ValueError(f"qem_reference must be one of {QEM_REFERENCES}, got {qem_reference!r}")
    for label, value in (("qem", qem), ("avg_bits", avg_bits), ("max_bytes", max_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                                  or not math.isfinite(value) or value <= 0):
            raise ValueError(f"{label} must be a positive finite number, got {value!r}")
    ref_bits = check_bits(ref_bits, "ref_bits")
    spec = QuantizerSpec(per_channel, symmetric, clip, p)
    layers = _model_layers(model, filter_fn)
    keep = _check_keep(keep, layers)
    free = [name for name in layers if name not in keep]
    extra = {ref_bits} if qem is not None else set()
    table_bits = {name: sorted(set(candidates) | extra | ({keep[name]} if name in keep else set())) for name in layers}
    tables = error_tables(layers, table_bits, spec, backend=backend, num_threads=num_threads, progress=progress)
    if qem is not None:
        chosen = qem_bits(tables, free, candidates, float(qem), ref_bits, qem_reference)
        rule = {"name": "qem", "qem": float(qem), "ref_bits": ref_bits, "qem_reference": qem_reference}
    else:
        num_params = {name: m.weight.numel() for name, m in layers.items()}
        groups = {name: _groups(m, spec.per_channel) for name, m in layers.items()}
        chosen = budget_bits(tables, num_params, groups, free, keep, candidates, objective, avg_bits, max_bytes)
        rule = {"name": "budget", "objective": objective,
                **({"avg_bits": float(avg_bits)} if avg_bits is not None else {"max_bytes": int(max_bytes)})}
    chosen.update(keep)
    return _config(layers, chosen, tables, spec, candidates, _keep_note(rule, keep))


def uniform(
    model: nn.Module,
    bits: int,
    *,
    per_channel: bool = True,
    symmetric: bool = False,
    clip: str = "minmax",
    p: float = DEFAULT_P,
    keep: Optional[Mapping[str, int]] = None,
    filter_fn: Optional[FilterFn] = None,
    errors: bool = True,
    backend: Optional[str] = None,
    num_threads: Optional[int] = None,
) -> BitConfig:
    """The uniform baseline: every layer at ``bits`` (except ``keep``), as a :class:`BitConfig`.

    With ``errors=True`` the roundoff error at those bits is measured too, so the
    config can be compared with a searched one.
    """
    bits = check_bits(bits)
    spec = QuantizerSpec(per_channel, symmetric, clip, p)
    layers = _model_layers(model, filter_fn)
    keep = _check_keep(keep, layers)
    chosen = {name: keep.get(name, bits) for name in layers}
    tables = {}
    if errors:
        tables = error_tables(layers, {n: [b] for n, b in chosen.items()}, spec, backend=backend,
                              num_threads=num_threads)
    rule = _keep_note({"name": "uniform", "bits": bits}, keep)
    return _config(layers, chosen, tables, spec, [bits], rule)
