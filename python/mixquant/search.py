"""The MixQuant search: per-layer weight bit-widths from per-layer roundoff error.

Two rules pick the bits from the error table (layers x candidate bit-widths):

* QEM rule (the paper's quantization error multiplier): each layer takes the
  smallest candidate ``b`` with ``err(b) <= qem * err_ref``; the reference is
  the layer's own error at ``ref_bits`` (``qem_reference="layer"``) or the
  median over layers of the normalised error at ``ref_bits`` (``"model"``).
* Budget rule: minimise the summed error (``objective``) subject to a
  parameter-weighted average bit-width or a byte budget, solved exactly as a
  multiple-choice knapsack (:mod:`mixquant.knapsack`).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Mapping, Optional

import numpy as np
import torch.nn as nn

from .bitconfig import BitConfig, layer_bytes
from .error import RoundoffError, check_bit_list, roundoff_error
from .kernels import check_bits
from .knapsack import InfeasibleBudget, solve_mckp
from .layers import FilterFn, channel_axis, find_layers

OBJECTIVES = ("mse", "norm", "sse")
QEM_REFERENCES = ("layer", "model")
DEFAULT_OBJECTIVE = "norm"

__all__ = ["search", "uniform", "error_tables", "OBJECTIVES", "DEFAULT_OBJECTIVE"]


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


def error_tables(
    layers: Mapping[str, nn.Module],
    bits: Dict[str, List[int]],
    *,
    per_channel: bool,
    symmetric: bool,
    clip: str,
    p: float,
    backend: Optional[str],
    num_threads: Optional[int],
    progress: bool = False,
) -> Dict[str, RoundoffError]:
    """Roundoff-error table of every layer at its candidate bit-widths."""
    items = list(layers.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="roundoff error", unit="layer")
    return {
        name: roundoff_error(
            module.weight, bits[name], per_channel=per_channel, symmetric=symmetric, clip=clip, p=p,
            ch_axis=channel_axis(module), backend=backend, num_threads=num_threads, name=f"weight of layer {name!r}",
        )
        for name, module in items
    }


def _table_dict(err: RoundoffError) -> Dict[str, List[float]]:
    return {
        "bits": [int(b) for b in err.bits],
        "sse": err.sse.tolist(),
        "mse": err.mse.tolist(),
        "norm": err.norm.tolist(),
        "max_abs": err.max_abs.tolist(),
    }


def _groups(module: nn.Module, per_channel: bool) -> int:
    return int(module.weight.shape[channel_axis(module)]) if per_channel else 1


def _config(layers, chosen, tables, *, per_channel, symmetric, clip, p, candidates, rule) -> BitConfig:
    return BitConfig(
        bits={name: int(chosen[name]) for name in layers},
        shapes={name: tuple(int(s) for s in m.weight.shape) for name, m in layers.items()},
        groups={name: _groups(m, per_channel) for name, m in layers.items()},
        per_channel=bool(per_channel),
        symmetric=bool(symmetric),
        clip=clip,
        p=float(p),
        candidates=list(candidates),
        rule=rule,
        errors={name: _table_dict(t) for name, t in tables.items()},
    )


def _qem_bits(tables: Dict[str, RoundoffError], free: List[str], candidates: List[int], qem: float,
              ref_bits: int, reference: str) -> Dict[str, int]:
    chosen = {}
    if reference == "model":
        model_ref = float(np.median([tables[n].at(ref_bits)["norm"] for n in tables]))
    for name in free:
        t = tables[name]
        metric, ref = ("norm", model_ref) if reference == "model" else ("sse", t.at(ref_bits)["sse"])
        values = {int(b): float(v) for b, v in zip(t.bits, getattr(t, metric))}
        ok = [b for b in candidates if values[b] <= qem * ref]
        chosen[name] = ok[0] if ok else candidates[-1]
    return chosen


def _budget_bits(tables, layers, free, keep, candidates, objective, per_channel, avg_bits, max_bytes):
    names = free + list(keep)
    options = {name: candidates if name in free else [keep[name]] for name in names}
    n = {name: layers[name].weight.numel() for name in names}
    g = {name: _groups(layers[name], per_channel) for name in names}
    if avg_bits is not None:
        weight = lambda name, b: n[name] * b
        total = sum(n.values())
        capacity = math.floor(avg_bits * total + 1e-9 * total)
    else:
        weight = lambda name, b: layer_bytes(n[name], b, g[name])
        capacity = int(max_bytes)
    costs, weights = [], []
    for name in names:
        t = tables[name]
        per_bit = {int(b): float(v) for b, v in zip(t.bits, getattr(t, objective))}
        costs.append([per_bit[b] for b in options[name]])
        weights.append([weight(name, b) for b in options[name]])
    try:
        choice = solve_mckp(weights, costs, capacity)
    except InfeasibleBudget:
        lightest = sum(w[0] for w in weights)
        if avg_bits is not None:
            raise ValueError(f"avg_bits={avg_bits} is below the smallest reachable average "
                             f"{lightest / sum(n.values()):.4f} (every free layer at {candidates[0]} bits, "
                             f"kept layers at their bits)") from None
        raise ValueError(f"max_bytes={max_bytes} is below the smallest reachable size {lightest} bytes") from None
    return {name: options[name][i] for name, i in zip(names, choice)}


def search(
    model: nn.Module,
    bits: Iterable[int] = range(2, 9),
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
    p: float = 2.0,
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
    layers = _model_layers(model, filter_fn)
    keep = _check_keep(keep, layers)
    free = [name for name in layers if name not in keep]
    extra = {ref_bits} if qem is not None else set()
    table_bits = {name: sorted(set(candidates) | extra | ({keep[name]} if name in keep else set())) for name in layers}
    tables = error_tables(layers, table_bits, per_channel=per_channel, symmetric=symmetric, clip=clip, p=p,
                          backend=backend, num_threads=num_threads, progress=progress)
    if qem is not None:
        chosen = _qem_bits(tables, free, candidates, float(qem), ref_bits, qem_reference)
        rule = {"name": "qem", "qem": float(qem), "ref_bits": ref_bits, "qem_reference": qem_reference}
    else:
        chosen = _budget_bits(tables, layers, free, keep, candidates, objective, per_channel, avg_bits, max_bytes)
        rule = {"name": "budget", "objective": objective,
                **({"avg_bits": float(avg_bits)} if avg_bits is not None else {"max_bytes": int(max_bytes)})}
    chosen.update(keep)
    if keep:
        rule["keep"] = ",".join(f"{k}={v}" for k, v in keep.items())
    return _config(layers, chosen, tables, per_channel=per_channel, symmetric=symmetric, clip=clip, p=p,
                   candidates=candidates, rule=rule)


def uniform(
    model: nn.Module,
    bits: int,
    *,
    per_channel: bool = True,
    symmetric: bool = False,
    clip: str = "minmax",
    p: float = 2.0,
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
    layers = _model_layers(model, filter_fn)
    keep = _check_keep(keep, layers)
    chosen = {name: keep.get(name, bits) for name in layers}
    tables = {}
    if errors:
        tables = error_tables(layers, {n: [b] for n, b in chosen.items()}, per_channel=per_channel,
                              symmetric=symmetric, clip=clip, p=p, backend=backend, num_threads=num_threads)
    rule = {"name": "uniform", "bits": bits}
    if keep:
        rule["keep"] = ",".join(f"{k}={v}" for k, v in keep.items())
    return _config(layers, chosen, tables, per_channel=per_channel, symmetric=symmetric, clip=clip, p=p,
                   candidates=[bits], rule=rule)
