"""``mixquant.search`` and ``mixquant.uniform``: per-layer weight bit-widths for a model.

The search measures every quantizable layer's roundoff error at each
candidate bit-width (:mod:`mixquant.allocation.tables`) and picks the bits with
the QEM or the budget rule (:mod:`mixquant.allocation.rules`); the result is a
:class:`~mixquant.BitConfig`. :func:`decide` is the part after the tables,
shared with the checkpoint search (:mod:`.checkpoint`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch.nn as nn

from ..allocation.bitconfig import BitConfig, param_groups
from ..allocation.rules import DEFAULT_OBJECTIVE, OBJECTIVES, QEM_REFERENCES, budget_bits, budget_layout, qem_bits
from ..allocation.tables import error_tables, layout_tables, table_dict
from ..core.error import RoundoffError
from ..core.limits import DEFAULT_CANDIDATES, DEFAULT_P
from ..core.spec import QuantizerSpec, check_group_size
from ..core.tensors import check_bit_list, check_bits
from ..nn.layers import FilterFn, channel_axis, find_layers, tied_weights

__all__ = ["search", "uniform", "SearchRule", "check_rule", "layout_options", "decide"]

GroupSizes = Union[None, int, Sequence[Optional[int]]]


@dataclass(frozen=True)
class SearchRule:
    """The validated rule arguments of a search (exactly one of qem / avg_bits / max_bytes / bits_per_weight)."""

    candidates: List[int]
    qem: Optional[float]
    ref_bits: int
    qem_reference: str
    avg_bits: Optional[float]
    max_bytes: Optional[int]
    bits_per_weight: Optional[float]
    objective: str

    def table_bits(self, names: Iterable[str], keep: Mapping[str, int]) -> Dict[str, List[int]]:
        """The bit-widths each layer's table must hold: the candidates, the QEM reference, its pinned bits."""
        extra = {self.ref_bits} if self.qem is not None else set()
        return {n: sorted(set(self.candidates) | extra | ({keep[n]} if n in keep else set())) for n in names}


def check_rule(bits: Iterable[int], qem: Optional[float], ref_bits: int, qem_reference: str,
               avg_bits: Optional[float], max_bytes: Optional[int], bits_per_weight: Optional[float],
               objective: str) -> SearchRule:
    """Validate the rule arguments of :func:`search`; ValueError naming the bad one."""
    candidates = check_bit_list(bits)
    budgets = (("qem", qem), ("avg_bits", avg_bits), ("max_bytes", max_bytes), ("bits_per_weight", bits_per_weight))
    given = [k for k, v in budgets if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of qem, avg_bits, max_bytes, bits_per_weight (got {given or 'none'})")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if qem_reference not in QEM_REFERENCES:
        raise ValueError(f"qem_reference must be one of {QEM_REFERENCES}, got {qem_reference!r}")
    for label, value in budgets:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                                  or not math.isfinite(value) or value <= 0):
            raise ValueError(f"{label} must be a positive finite number, got {value!r}")
    return SearchRule(candidates, qem, check_bits(ref_bits, "ref_bits"), qem_reference, avg_bits, max_bytes,
                      bits_per_weight, objective)


def layout_options(group_size: GroupSizes, per_channel: bool, rule: SearchRule) -> Tuple[List[Optional[int]], bool]:
    """The group sizes to measure and whether the budget rule chooses among them per layer.

    ``group_size`` is None or an int (one layout for every layer), or a list of
    them (``None`` meaning per channel) for the budget rule to choose from.
    """
    if group_size is None or isinstance(group_size, (int, np.integer)) and not isinstance(group_size, bool):
        sizes, chosen = [check_group_size(group_size)], False
    elif isinstance(group_size, (list, tuple)):
        if not group_size:
            raise ValueError("group_size is an empty list: give None, an int, or a non-empty list of them")
        sizes = list(dict.fromkeys(check_group_size(g, "group_size entry") for g in group_size))
        chosen = len(sizes) > 1
    else:
        raise TypeError(f"group_size must be None, an int or a list of them, got {type(group_size).__name__}")
    if any(g is not None for g in sizes) and not per_channel:
        raise ValueError("group_size needs per_channel=True: groups split each output channel's row")
    if chosen and (rule.qem is not None or rule.avg_bits is not None):
        raise ValueError("choosing the group size per layer needs a budget that counts the scales: give "
                         "bits_per_weight or max_bytes (avg_bits counts code bits only; qem has no budget)")
    return sizes, chosen


def _check_keep(keep: Optional[Mapping[str, int]], names: Sequence[str]) -> Dict[str, int]:
    if keep is None:
        return {}
    if not isinstance(keep, Mapping):
        raise TypeError(f"keep must be a dict {{layer name: bits}}, got {type(keep).__name__}")
    out = {}
    known_set = set(names)
    for name, bits in keep.items():
        if name not in known_set:
            known = ", ".join(list(names)[:8])
            raise ValueError(f"keep names layer {name!r}, which is not a quantizable layer of the model "
                             f"(known: {known}{', ...' if len(names) > 8 else ''})")
        out[name] = check_bits(bits, f"keep[{name!r}]")
    return out


def _model_layers(model: nn.Module, filter_fn: Optional[FilterFn], embeddings: bool) -> "Dict[str, nn.Module]":
    layers = find_layers(model, filter_fn, embeddings=embeddings)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no quantizable layer (Linear, Conv*, ConvTranspose*, Embedding with "
            "embeddings=True, or a type added with mixquant.register_quantizable) left after filter_fn"
        )
    return layers


def _keep_note(rule: dict, keep: Mapping[str, int]) -> dict:
    if keep:
        rule["keep"] = ",".join(f"{k}={v}" for k, v in keep.items())
    return rule


def _sizes_text(sizes: Sequence[Optional[int]]) -> str:
    return ",".join("none" if g is None else str(g) for g in sizes)


def decide(
    shapes: Mapping[str, Tuple[int, ...]],
    axes: Mapping[str, int],
    tables: Mapping[str, Mapping[Optional[int], RoundoffError]],
    spec: QuantizerSpec,
    rule: SearchRule,
    sizes: List[Optional[int]],
    chosen: bool,
    keep: Mapping[str, int],
    tied: Optional[Mapping[str, List[str]]] = None,
) -> BitConfig:
    """Apply the search rule to measured tables and build the :class:`BitConfig`.

    ``tables[name][group_size]`` holds each layer's table for every layout in
    ``sizes``; ``chosen`` lets the budget rule pick the layout per layer.
    """
    names = list(shapes)
    free = [n for n in names if n not in keep]
    num_params = {n: math.prod(shapes[n]) for n in names}
    groups = {n: {g: param_groups(shapes[n], axes[n], spec.per_channel, g) for g in sizes} for n in names}
    layer_gs: Dict[str, Optional[int]] = {}
    if rule.qem is not None:
        only = {n: tables[n][sizes[0]] for n in names}
        chosen_bits = qem_bits(only, free, rule.candidates, float(rule.qem), rule.ref_bits, rule.qem_reference)
        out_rule = {"name": "qem", "qem": float(rule.qem), "ref_bits": rule.ref_bits,
                    "qem_reference": rule.qem_reference}
    else:
        budget = ({"avg_bits": float(rule.avg_bits)} if rule.avg_bits is not None else
                  {"max_bytes": int(rule.max_bytes)} if rule.max_bytes is not None else
                  {"bits_per_weight": float(rule.bits_per_weight)})
        out_rule = {"name": "budget", "objective": rule.objective, **budget}
        if chosen:
            pairs = budget_layout(tables, num_params, groups, free, dict(keep), rule.candidates, rule.objective,
                                  rule.max_bytes, rule.bits_per_weight)
            chosen_bits = {n: b for n, (b, _) in pairs.items()}
            layer_gs = {n: pairs[n][1] for n in names}
            out_rule["group_sizes"] = _sizes_text(sizes)
        else:
            only = {n: tables[n][sizes[0]] for n in names}
            chosen_bits = budget_bits(only, num_params, {n: groups[n][sizes[0]] for n in names}, free, dict(keep),
                                      rule.candidates, rule.objective, rule.avg_bits, rule.max_bytes,
                                      rule.bits_per_weight, grouped=sizes[0] is not None)
    chosen_bits.update(keep)
    gs_of = {n: layer_gs.get(n, sizes[0]) for n in names}
    return BitConfig(
        bits={n: int(chosen_bits[n]) for n in names},
        shapes={n: tuple(int(s) for s in shapes[n]) for n in names},
        groups={n: groups[n][gs_of[n]] for n in names},
        per_channel=spec.per_channel,
        symmetric=spec.symmetric,
        clip=spec.clip,
        p=spec.p,
        candidates=list(rule.candidates),
        rule=_keep_note(out_rule, keep),
        errors={n: table_dict(tables[n][gs_of[n]]) for n in names},
        group_size=None if chosen else sizes[0],
        layer_group_size=layer_gs,
        tied={n: list(v) for n, v in (tied or {}).items() if n in shapes},
    )


def search(
    model: nn.Module,
    bits: Iterable[int] = DEFAULT_CANDIDATES,
    *,
    qem: Optional[float] = None,
    ref_bits: int = 8,
    qem_reference: str = "layer",
    avg_bits: Optional[float] = None,
    max_bytes: Optional[int] = None,
    bits_per_weight: Optional[float] = None,
    objective: str = DEFAULT_OBJECTIVE,
    per_channel: bool = True,
    symmetric: bool = False,
    clip: str = "minmax",
    p: float = DEFAULT_P,
    group_size: GroupSizes = None,
    keep: Optional[Mapping[str, int]] = None,
    filter_fn: Optional[FilterFn] = None,
    embeddings: bool = False,
    backend: Optional[str] = None,
    num_threads: Optional[int] = None,
    progress: bool = False,
) -> BitConfig:
    """Find a weight bit-width for every quantizable layer of ``model``.

    Give exactly one of ``qem`` (threshold rule), ``avg_bits`` (parameter-weighted
    average of code bits), ``max_bytes`` (storage budget, see
    :attr:`BitConfig.size_bytes`) or ``bits_per_weight`` (stored bits per weight,
    scales and zero points included: ``8 * size_bytes / weights``). ``bits`` are the
    candidates; ``keep`` pins layers (e.g. ``{"conv1": 8, "fc": 8}``) and they count
    toward the budget; ``filter_fn(module, fqn)`` leaves layers out entirely;
    ``embeddings=True`` selects ``nn.Embedding`` layers too. ``objective`` is the
    per-layer error the budget rule sums: ``"norm"`` (error / weight energy,
    1/SQNR), ``"mse"`` (per-layer mean squared error) or ``"sse"`` (sum of squared
    error; lets large layers dominate).

    ``group_size``: None (per channel, or per tensor), an int (groups of that many
    consecutive weights along each output channel's row, bfloat16 scales), or a
    list such as ``[None, 128, 64]`` for the budget rule (``max_bytes`` or
    ``bits_per_weight``) to choose a (bit-width, group size) pair per layer.

    A weight shared by several modules (tied) is one layer, counted once. The
    result is deterministic.
    """
    rule = check_rule(bits, qem, ref_bits, qem_reference, avg_bits, max_bytes, bits_per_weight, objective)
    spec = QuantizerSpec(per_channel, symmetric, clip, p)
    sizes, chosen = layout_options(group_size, per_channel, rule)
    layers = _model_layers(model, filter_fn, embeddings)
    keep = _check_keep(keep, list(layers))
    tables = layout_tables(layers, rule.table_bits(layers, keep), spec, sizes, backend=backend,
                           num_threads=num_threads, progress=progress)
    shapes = {n: tuple(m.weight.shape) for n, m in layers.items()}
    axes = {n: channel_axis(m) for n, m in layers.items()}
    return decide(shapes, axes, tables, spec, rule, sizes, chosen, keep, tied_weights(model, layers))


def uniform(
    model: nn.Module,
    bits: int,
    *,
    per_channel: bool = True,
    symmetric: bool = False,
    clip: str = "minmax",
    p: float = DEFAULT_P,
    group_size: Optional[int] = None,
    keep: Optional[Mapping[str, int]] = None,
    filter_fn: Optional[FilterFn] = None,
    embeddings: bool = False,
    errors: bool = True,
    backend: Optional[str] = None,
    num_threads: Optional[int] = None,
) -> BitConfig:
    """The uniform baseline: every layer at ``bits`` (except ``keep``), as a :class:`BitConfig`.

    With ``errors=True`` the roundoff error at those bits is measured too, so the
    config can be compared with a searched one. ``group_size`` and ``embeddings``
    as in :func:`search`.
    """
    bits = check_bits(bits)
    spec = QuantizerSpec(per_channel, symmetric, clip, p, group_size=check_group_size(group_size))
    layers = _model_layers(model, filter_fn, embeddings)
    keep = _check_keep(keep, list(layers))
    chosen = {name: keep.get(name, bits) for name in layers}
    tables = {}
    if errors:
        tables = error_tables(layers, {n: [b] for n, b in chosen.items()}, spec, backend=backend,
                              num_threads=num_threads)
    shapes = {n: tuple(int(s) for s in m.weight.shape) for n, m in layers.items()}
    return BitConfig(
        bits=chosen,
        shapes=shapes,
        groups={n: param_groups(shapes[n], channel_axis(m), per_channel, spec.group_size) for n, m in layers.items()},
        per_channel=per_channel,
        symmetric=symmetric,
        clip=clip,
        p=spec.p,
        candidates=[bits],
        rule=_keep_note({"name": "uniform", "bits": bits}, keep),
        errors={name: table_dict(t) for name, t in tables.items()},
        group_size=spec.group_size,
        tied=tied_weights(model, layers),
    )
