"""``mixquant.search`` and ``mixquant.uniform``: per-layer weight bit-widths for a model.

The search measures every quantizable layer's roundoff error at each
candidate bit-width (:mod:`mixquant.allocation.tables`), optionally weighs it
by what the network feels on calibration data (:mod:`mixquant.allocation.sensitivity`),
and picks the bits with the QEM or the budget rule (:mod:`mixquant.allocation.rules`);
the result is a :class:`~mixquant.BitConfig`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional

import numpy as np
import torch.nn as nn

from ..allocation.bitconfig import BitConfig
from ..allocation.rules import DEFAULT_OBJECTIVE, OBJECTIVES, QEM_REFERENCES, budget_bits, qem_bits
from ..allocation.sensitivity import (
    DATA_SENSITIVITIES,
    DEFAULT_DATA_SENSITIVITY,
    SENSITIVITIES,
    OutputLoss,
    measure_sensitivity,
)
from ..allocation.tables import error_tables, table_dict
from ..core.limits import DEFAULT_CANDIDATES, DEFAULT_P, MAX_BITS
from ..nn.batches import collect_batches, provenance
from ..core.spec import QuantizerSpec
from ..core.tensors import check_bit_list, check_bits
from ..nn.layers import FilterFn, channel_axis, find_layers

__all__ = ["search", "uniform", "measure", "choose", "Measurement"]


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


def _config(layers, chosen, tables, spec: QuantizerSpec, candidates, rule, sensitivity: str = "weight",
            costs: Optional[Mapping[str, Any]] = None, calibration: Optional[dict] = None) -> BitConfig:
    errors = {name: table_dict(t) for name, t in tables.items()}
    for name, values in (costs or {}).items():
        errors[name]["sensitivity"] = [float(v) for v in values]
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
        errors=errors,
        sensitivity=sensitivity,
        calibration=calibration,
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
    objective: Optional[str] = None,
    per_channel: bool = True,
    symmetric: bool = False,
    clip: str = "minmax",
    p: float = DEFAULT_P,
    keep: Optional[Mapping[str, int]] = None,
    filter_fn: Optional[FilterFn] = None,
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
    average bit-width budget) or ``max_bytes`` (storage budget, see
    :attr:`BitConfig.size_bytes`). ``bits`` are the candidates; ``keep`` pins
    layers (e.g. ``{"conv1": 8, "fc": 8}``) and they count toward the budget;
    ``filter_fn(module, fqn)`` leaves layers out entirely. ``objective`` is the
    per-layer error the budget rule sums for the data-free table: ``"norm"``
    (error / weight energy, 1/SQNR; the default), ``"mse"`` (per-layer mean
    squared error) or ``"sse"`` (sum of squared error; lets large layers dominate).

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
    data's provenance (sample count, a hash). The result is deterministic.
    """.replace("{default}", DEFAULT_DATA_SENSITIVITY)
    candidates = check_bit_list(bits)
    sensitivity, _ = _check_rule(qem, ref_bits, qem_reference, avg_bits, max_bytes, objective, sensitivity,
                                 calib_data)
    measured = measure(model, candidates, per_channel=per_channel, symmetric=symmetric, clip=clip, p=p, keep=keep,
                       filter_fn=filter_fn, sensitivity=sensitivity, calib_data=calib_data,
                       calib_samples=calib_samples, output_loss=output_loss, seed=seed,
                       extra_bits=[ref_bits] if qem is not None else [], backend=backend, num_threads=num_threads,
                       progress=progress)
    return choose(measured, qem=qem, ref_bits=ref_bits, qem_reference=qem_reference, avg_bits=avg_bits,
                  max_bytes=max_bytes, objective=objective)


def _check_rule(qem, ref_bits, qem_reference, avg_bits, max_bytes, objective, sensitivity, calib_data):
    """Validate the rule's arguments (before any measuring); return the resolved sensitivity and objective."""
    given = [k for k, v in (("qem", qem), ("avg_bits", avg_bits), ("max_bytes", max_bytes)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of qem, avg_bits, max_bytes (got {given or 'none'})")
    if sensitivity is None:
        sensitivity = "weight" if calib_data is None else DEFAULT_DATA_SENSITIVITY
    if sensitivity not in SENSITIVITIES:
        raise ValueError(f"sensitivity must be one of {SENSITIVITIES}, got {sensitivity!r}")
    data_aware = sensitivity in DATA_SENSITIVITIES
    if data_aware and calib_data is None:
        raise ValueError(f"sensitivity={sensitivity!r} needs calib_data (a tensor, a dict of inputs, a DataLoader "
                         "or an iterable of batches)")
    if data_aware and objective is not None:
        raise ValueError(f"objective applies to sensitivity='weight' only; {sensitivity!r} costs are comparable "
                         "across layers and summed as they are")
    objective = DEFAULT_OBJECTIVE if objective is None else objective
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if qem_reference not in QEM_REFERENCES:
        raise ValueError(f"qem_reference must be one of {QEM_REFERENCES}, got {qem_reference!r}")
    for label, value in (("qem", qem), ("avg_bits", avg_bits), ("max_bytes", max_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                                  or not math.isfinite(value) or value <= 0):
            raise ValueError(f"{label} must be a positive finite number, got {value!r}")
    if avg_bits is not None and avg_bits > MAX_BITS:  # a bit config could not record it (and it bounds nothing)
        raise ValueError(f"avg_bits must be at most {MAX_BITS} (the widest bit-width), got {avg_bits!r}")
    check_bits(ref_bits, "ref_bits")
    return sensitivity, objective


@dataclass
class Measurement:
    """What :func:`measure` found: every layer's tables, measured once, for :func:`choose` to apply rules to.

    Measuring is the expensive part of a search (a data-aware sensitivity runs
    the model); one measurement serves any number of budgets.
    """

    layers: Dict[str, nn.Module]
    spec: QuantizerSpec
    candidates: List[int]
    keep: Dict[str, int]
    tables: Dict[str, Any]
    sensitivity: str = "weight"
    costs: Optional[Dict[str, np.ndarray]] = None
    calibration: Optional[Dict[str, Any]] = None
    seconds: Dict[str, float] = field(default_factory=dict)

    def cost_table(self, metric: str) -> Dict[str, Dict[int, float]]:
        """layer -> bits -> cost: the data-aware cost, or a weight metric (``"norm"``, ``"sse"``, ...)."""
        if self.costs is not None:
            return {n: dict(zip((int(b) for b in self.tables[n].bits), map(float, self.costs[n]))) for n in self.layers}
        return {n: dict(zip((int(b) for b in t.bits), map(float, getattr(t, metric)))) for n, t in self.tables.items()}


def measure(
    model: nn.Module,
    bits: Iterable[int] = DEFAULT_CANDIDATES,
    *,
    per_channel: bool = True,
    symmetric: bool = False,
    clip: str = "minmax",
    p: float = DEFAULT_P,
    keep: Optional[Mapping[str, int]] = None,
    filter_fn: Optional[FilterFn] = None,
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
    candidates (the QEM rule's ``ref_bits``).
    """
    candidates = check_bit_list(bits)
    if sensitivity not in SENSITIVITIES:
        raise ValueError(f"sensitivity must be one of {SENSITIVITIES}, got {sensitivity!r}")
    spec = QuantizerSpec(per_channel, symmetric, clip, p)
    layers = _model_layers(model, filter_fn)
    keep = _check_keep(keep, layers)
    extra = {check_bits(b, "extra_bits") for b in extra_bits}
    table_bits = {name: sorted(set(candidates) | extra | ({keep[name]} if name in keep else set())) for name in layers}
    t0 = time.perf_counter()
    tables = error_tables(layers, table_bits, spec, backend=backend, num_threads=num_threads, progress=progress)
    out = Measurement(dict(layers), spec, candidates, keep, tables, sensitivity,
                      seconds={"weight_tables": time.perf_counter() - t0})
    if sensitivity in DATA_SENSITIVITIES:
        if calib_data is None:
            raise ValueError(f"sensitivity={sensitivity!r} needs calib_data")
        t0 = time.perf_counter()
        batches = collect_batches(calib_data, calib_samples)
        result = measure_sensitivity(sensitivity, model, layers, tables, batches, output_loss=output_loss, seed=seed,
                                     backend=backend, num_threads=num_threads, progress=progress)
        out.costs = result.costs
        out.seconds.update(result.seconds)
        out.seconds["sensitivity"] = time.perf_counter() - t0
        out.calibration = {**provenance(batches), "seconds": round(out.seconds["sensitivity"], 3)}
    return out


def choose(
    measured: Measurement,
    *,
    qem: Optional[float] = None,
    ref_bits: int = 8,
    qem_reference: str = "layer",
    avg_bits: Optional[float] = None,
    max_bytes: Optional[int] = None,
    objective: Optional[str] = None,
) -> BitConfig:
    """The second half of :func:`search`: apply the QEM or the budget rule to a :class:`Measurement`."""
    data_aware = measured.costs is not None
    _, objective = _check_rule(qem, ref_bits, qem_reference, avg_bits, max_bytes, objective, measured.sensitivity,
                               True if data_aware else None)
    layers, keep, candidates = measured.layers, measured.keep, measured.candidates
    free = [name for name in layers if name not in keep]
    if qem is not None:
        costs = measured.cost_table("norm" if qem_reference == "model" else "sse")
        chosen = qem_bits(costs, free, candidates, float(qem), ref_bits, qem_reference)
        rule = {"name": "qem", "qem": float(qem), "ref_bits": ref_bits, "qem_reference": qem_reference}
    else:
        num_params = {name: m.weight.numel() for name, m in layers.items()}
        groups = {name: _groups(m, measured.spec.per_channel) for name, m in layers.items()}
        chosen = budget_bits(measured.cost_table(objective), num_params, groups, free, keep, candidates, avg_bits,
                             max_bytes)
        rule = {"name": "budget",
                **({"objective": objective} if not data_aware else {}),
                **({"avg_bits": float(avg_bits)} if avg_bits is not None else {"max_bytes": int(max_bytes)})}
    chosen.update(keep)
    return _config(layers, chosen, measured.tables, measured.spec, candidates, _keep_note(rule, keep),
                   measured.sensitivity, measured.costs, measured.calibration)


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
