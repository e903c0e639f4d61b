"""``mixquant.search`` and ``mixquant.uniform``: per-layer weight bit-widths for a model.

The search measures every quantizable layer's roundoff error at each
candidate bit-width (:mod:`mixquant.allocation.tables`), optionally weighs it
by what the network feels on calibration data (:mod:`mixquant.allocation.sensitivity`),
and picks the bits with the QEM or the budget rule (:mod:`mixquant.allocation.rules`);
the result is a :class:`~mixquant.BitConfig`. The work is split in two:
:func:`measure` (the tables, and the data-aware costs: the expensive part) and
:func:`choose` (a rule applied to a measurement: any number of budgets from one
measurement). :func:`decide` is the part after the tables, shared with the
checkpoint search (:mod:`.checkpoint`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch.nn as nn

from ..allocation.bitconfig import BitConfig, param_groups
from ..allocation.rules import DEFAULT_OBJECTIVE, OBJECTIVES, QEM_REFERENCES, budget_bits, budget_layout, qem_bits
from ..allocation.sensitivity import (
    DATA_SENSITIVITIES,
    DEFAULT_DATA_SENSITIVITY,
    SENSITIVITIES,
    OutputLoss,
    measure_sensitivity,
)
from ..allocation.tables import error_tables, layout_tables, table_dict
from ..core.error import RoundoffError
from ..core.limits import DEFAULT_CANDIDATES, DEFAULT_P, MAX_BITS
from ..core.spec import QuantizerSpec, check_group_size
from ..core.tensors import check_bit_list, check_bits
from ..nn.batches import collect_batches, provenance
from ..nn.layers import FilterFn, channel_axis, find_layers, tied_weights
from ..nn.order import first_last_layers

__all__ = ["search", "uniform", "measure", "choose", "Measurement", "SearchRule", "check_rule", "layout_options",
           "decide", "keep_first_last", "FIRST_LAST_BITS"]

GroupSizes = Union[None, int, Sequence[Optional[int]]]

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
    if avg_bits is not None and avg_bits > MAX_BITS:  # a bit config could not record it (and it bounds nothing)
        raise ValueError(f"avg_bits must be at most {MAX_BITS} (the widest bit-width), got {avg_bits!r}")
    return SearchRule(candidates, qem, check_bits(ref_bits, "ref_bits"), qem_reference, avg_bits, max_bytes,
                      bits_per_weight, objective)


def _check_sensitivity(sensitivity: Optional[str], calib_data: Any, objective: Optional[str]) -> Tuple[str, str]:
    """The resolved sensitivity and objective (checked before any measuring)."""
    if sensitivity is None:
        sensitivity = "weight" if calib_data is None else DEFAULT_DATA_SENSITIVITY
    if sensitivity not in SENSITIVITIES:
        raise ValueError(f"sensitivity must be one of {SENSITIVITIES}, got {sensitivity!r}")
    if sensitivity in DATA_SENSITIVITIES:
        if calib_data is None:
            raise ValueError(f"sensitivity={sensitivity!r} needs calib_data (a tensor, a dict of inputs, a "
                             "DataLoader or an iterable of batches)")
        if objective is not None:
            raise ValueError(f"objective applies to sensitivity='weight' only; {sensitivity!r} costs are "
                             "comparable across layers and summed as they are")
    return sensitivity, DEFAULT_OBJECTIVE if objective is None else objective


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


def _cost_map(tables: Mapping[str, RoundoffError], metric: str) -> Dict[str, Dict[int, float]]:
    return {n: dict(zip((int(b) for b in t.bits), map(float, getattr(t, metric)))) for n, t in tables.items()}


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
    sensitivity: str = "weight",
    costs: Optional[Mapping[str, np.ndarray]] = None,
    calibration: Optional[Dict[str, Any]] = None,
) -> BitConfig:
    """Apply the search rule to measured tables and build the :class:`BitConfig`.

    ``tables[name][group_size]`` holds each layer's table for every layout in
    ``sizes``; ``chosen`` lets the budget rule pick the layout per layer. With
    ``costs`` (a data-aware ``sensitivity``: ``[B]`` per layer, aligned with its
    table's bits) the rules read them instead of the weight metrics.
    """
    names = list(shapes)
    free = [n for n in names if n not in keep]
    num_params = {n: math.prod(shapes[n]) for n in names}
    groups = {n: {g: param_groups(shapes[n], axes[n], spec.per_channel, g) for g in sizes} for n in names}
    layer_gs: Dict[str, Optional[int]] = {}
    only = {n: tables[n][sizes[0]] for n in names}
    data_cost = None
    if costs is not None:
        data_cost = {n: dict(zip((int(b) for b in only[n].bits), map(float, costs[n]))) for n in names}
    if rule.qem is not None:
        qem_costs = data_cost or _cost_map(only, "norm" if rule.qem_reference == "model" else "sse")
        chosen_bits = qem_bits(qem_costs, free, rule.candidates, float(rule.qem), rule.ref_bits, rule.qem_reference)
        out_rule = {"name": "qem", "qem": float(rule.qem), "ref_bits": rule.ref_bits,
                    "qem_reference": rule.qem_reference}
    else:
        budget = ({"avg_bits": float(rule.avg_bits)} if rule.avg_bits is not None else
                  {"max_bytes": int(rule.max_bytes)} if rule.max_bytes is not None else
                  {"bits_per_weight": float(rule.bits_per_weight)})
        out_rule = {"name": "budget", **({} if data_cost else {"objective": rule.objective}), **budget}
        if chosen:
            pairs = budget_layout(tables, num_params, groups, free, dict(keep), rule.candidates, rule.objective,
                                  rule.max_bytes, rule.bits_per_weight)
            chosen_bits = {n: b for n, (b, _) in pairs.items()}
            layer_gs = {n: pairs[n][1] for n in names}
            out_rule["group_sizes"] = _sizes_text(sizes)
        else:
            chosen_bits = budget_bits(data_cost or _cost_map(only, rule.objective), num_params,
                                      {n: groups[n][sizes[0]] for n in names}, free, dict(keep), rule.candidates,
                                      rule.avg_bits, rule.max_bytes, rule.bits_per_weight,
                                      grouped=sizes[0] is not None)
    chosen_bits.update(keep)
    gs_of = {n: layer_gs.get(n, sizes[0]) for n in names}
    errors = {n: table_dict(tables[n][gs_of[n]]) for n in names}
    for n, values in (costs or {}).items():
        errors[n]["sensitivity"] = [float(v) for v in values]
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
        errors=errors,
        group_size=None if chosen else sizes[0],
        layer_group_size=layer_gs,
        tied={n: list(v) for n, v in (tied or {}).items() if n in shapes},
        sensitivity=sensitivity,
        calibration=calibration,
    )


@dataclass
class Measurement:
    """What :func:`measure` found, for :func:`choose` to apply rules to.

    Measuring is the expensive part of a search (a data-aware sensitivity runs
    the model); one measurement serves any number of budgets.
    """

    shapes: Dict[str, Tuple[int, ...]]
    axes: Dict[str, int]
    tables: Dict[str, Dict[Optional[int], RoundoffError]]
    spec: QuantizerSpec
    candidates: List[int]
    sizes: List[Optional[int]]
    keep: Dict[str, int]
    tied: Dict[str, List[str]]
    extra_bits: List[int] = field(default_factory=list)
    sensitivity: str = "weight"
    costs: Optional[Dict[str, np.ndarray]] = None
    calibration: Optional[Dict[str, Any]] = None
    seconds: Dict[str, float] = field(default_factory=dict)


def measure(
    model: nn.Module,
    bits: Iterable[int] = DEFAULT_CANDIDATES,
    *,
    per_channel: bool = True,
    symmetric: bool = False,
    clip: str = "minmax",
    p: float = DEFAULT_P,
    group_size: GroupSizes = None,
    keep: Optional[Mapping[str, int]] = None,
    filter_fn: Optional[FilterFn] = None,
    embeddings: bool = False,
    sensitivity: str = "weight",
    calib_data: Any = None,
    calib_samples: Optional[int] = None,
    output_loss: OutputLoss = "kl",
    seed: int = 0,
    extra_bits: Iterable[int] = (),
    backend: Optional[str] = None,
    num_threads: Optional[int] = None,
    progress: bool = False,
) -> Measurement:
    """The first half of :func:`search`: the weight tables and, for a data-aware sensitivity, the costs.

    Arguments as in :func:`search`; ``extra_bits`` are measured besides the
    candidates (the QEM rule's ``ref_bits``). A list of group sizes (the layout
    chosen per layer) works with the data-free table only.
    """
    candidates = check_bit_list(bits)
    sensitivity, _ = _check_sensitivity(sensitivity, calib_data, None)
    data_aware = sensitivity in DATA_SENSITIVITIES
    spec = QuantizerSpec(per_channel, symmetric, clip, p)
    probe = SearchRule(candidates, None, 8, "layer", None, 1, None, DEFAULT_OBJECTIVE)  # any budget that counts scales
    sizes, _ = layout_options(group_size, per_channel, probe)
    if data_aware and len(sizes) > 1:
        raise ValueError("choosing the group size per layer works with sensitivity='weight' only; give one "
                         "group_size with a data-aware sensitivity")
    layers = _model_layers(model, filter_fn, embeddings)
    keep = _check_keep(keep, list(layers))
    extra = sorted({check_bits(b, "extra_bits") for b in extra_bits})
    table_bits = {n: sorted(set(candidates) | set(extra) | ({keep[n]} if n in keep else set())) for n in layers}
    t0 = time.perf_counter()
    if data_aware:  # the sensitivity reads each table's quantizers: keep them whole
        full = error_tables(layers, table_bits, spec.replace(group_size=sizes[0]), backend=backend,
                            num_threads=num_threads, progress=progress)
        tables = {n: {sizes[0]: t} for n, t in full.items()}
    else:
        tables = layout_tables(layers, table_bits, spec, sizes, backend=backend, num_threads=num_threads,
                               progress=progress)
    out = Measurement(shapes={n: tuple(m.weight.shape) for n, m in layers.items()},
                      axes={n: channel_axis(m) for n, m in layers.items()}, tables=tables, spec=spec,
                      candidates=candidates, sizes=sizes, keep=keep, tied=tied_weights(model, layers),
                      extra_bits=extra, sensitivity=sensitivity, seconds={"weight_tables": time.perf_counter() - t0})
    if data_aware:
        t0 = time.perf_counter()
        batches = collect_batches(calib_data, calib_samples)
        result = measure_sensitivity(sensitivity, model, layers, full, batches, output_loss=output_loss, seed=seed,
                                     backend=backend, num_threads=num_threads, progress=progress)
        out.costs = result.costs
        out.seconds.update(result.seconds)
        out.seconds["sensitivity"] = time.perf_counter() - t0
        out.calibration = {**provenance(batches), "seconds": round(out.seconds["sensitivity"], 3)}
        for n in tables:  # what a search keeps of every layer, as for the data-free tables
            tables[n] = {g: t.totals() for g, t in tables[n].items()}
    return out


def choose(
    measured: Measurement,
    *,
    qem: Optional[float] = None,
    ref_bits: int = 8,
    qem_reference: str = "layer",
    avg_bits: Optional[float] = None,
    max_bytes: Optional[int] = None,
    bits_per_weight: Optional[float] = None,
    objective: Optional[str] = None,
) -> BitConfig:
    """The second half of :func:`search`: apply the QEM or the budget rule to a :class:`Measurement`."""
    _, objective = _check_sensitivity(measured.sensitivity, True if measured.costs is not None else None, objective)
    rule = check_rule(measured.candidates, qem, ref_bits, qem_reference, avg_bits, max_bytes, bits_per_weight,
                      objective)
    sizes, chosen = layout_options(measured.sizes if len(measured.sizes) > 1 else measured.sizes[0],
                                   measured.spec.per_channel, rule)
    if qem is not None and ref_bits not in measured.candidates and ref_bits not in measured.extra_bits:
        raise ValueError(f"the measurement holds no table at ref_bits={ref_bits}; measure it (extra_bits=[{ref_bits}])")
    return decide(measured.shapes, measured.axes, measured.tables, measured.spec, rule, sizes, chosen, measured.keep,
                  measured.tied, measured.sensitivity, measured.costs, measured.calibration)


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
    objective: Optional[str] = None,
    per_channel: bool = True,
    symmetric: bool = False,
    clip: str = "minmax",
    p: float = DEFAULT_P,
    group_size: GroupSizes = None,
    keep: Optional[Mapping[str, int]] = None,
    filter_fn: Optional[FilterFn] = None,
    embeddings: bool = False,
    sensitivity: Optional[str] = None,
    calib_data: Any = None,
    calib_samples: Optional[int] = None,
    output_loss: OutputLoss = "kl",
    seed: int = 0,
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
    per-layer error the budget rule sums for the data-free table: ``"norm"``
    (error / weight energy, 1/SQNR; the default), ``"mse"`` (per-layer mean squared
    error) or ``"sse"`` (sum of squared error; lets large layers dominate).

    ``group_size``: None (per channel, or per tensor), an int (groups of that many
    consecutive weights along each output channel's row, bfloat16 scales), or a
    list such as ``[None, 128, 64]`` for the budget rule (``max_bytes`` or
    ``bits_per_weight``) to choose a (bit-width, group size) pair per layer.

    ``sensitivity`` chooses what each layer's cost at each bit-width is:
    ``"weight"`` (the data-free roundoff-error table: the paper's method, the
    default without ``calib_data``), or a data-aware one measured on
    ``calib_data`` (see :mod:`mixquant.allocation.sensitivity`): ``"input"``,
    ``"output"``, ``"fisher"`` or ``"model"``. With ``calib_data`` and no
    ``sensitivity``, the data-aware default is used (``"{default}"``, chosen from
    the study in docs/RESULTS.md). Data-aware costs are comparable across
    layers and summed as they are (``objective`` applies to ``"weight"`` only).
    ``calib_data`` is a tensor, a dict of keyword inputs, a DataLoader or an
    iterable of batches (tensors, ``(inputs, labels)``, tuples of positional
    inputs or dicts; :mod:`mixquant.nn.batches`); ``calib_samples`` bounds the
    samples used (the cost grows with them); ``output_loss`` compares the
    model's outputs (``"kl"`` for logits of classifiers and language models,
    ``"cosine"`` or ``"mse"`` for embeddings and other outputs, or a callable
    ``(quantized, float) -> number``); ``seed`` seeds the random readout of
    non-logit outputs. The config records the sensitivity and the calibration
    data's provenance (sample count, a hash).

    A weight shared by several modules (tied) is one layer, counted once. The
    result is deterministic.
    """.replace("{default}", DEFAULT_DATA_SENSITIVITY)
    sensitivity, resolved = _check_sensitivity(sensitivity, calib_data, objective)
    rule = check_rule(bits, qem, ref_bits, qem_reference, avg_bits, max_bytes, bits_per_weight, resolved)
    layout_options(group_size, per_channel, rule)  # refuse a bad layout before measuring
    measured = measure(model, rule.candidates, per_channel=per_channel, symmetric=symmetric, clip=clip, p=p,
                       group_size=group_size, keep=keep, filter_fn=filter_fn, embeddings=embeddings,
                       sensitivity=sensitivity, calib_data=calib_data, calib_samples=calib_samples,
                       output_loss=output_loss, seed=seed, extra_bits=[rule.ref_bits] if qem is not None else [],
                       backend=backend, num_threads=num_threads, progress=progress)
    return choose(measured, qem=qem, ref_bits=ref_bits, qem_reference=qem_reference, avg_bits=avg_bits,
                  max_bytes=max_bytes, bits_per_weight=bits_per_weight, objective=objective)


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
