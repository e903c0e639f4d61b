"""Markdown report of experiment results (``docs/RESULTS.md``).

Every number comes from the results dict of :func:`mixquant.experiments.run_experiments`.
Hand-written text between ``<!-- notes:start -->`` and ``<!-- notes:end -->`` in an
existing report is kept when the report is written again.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..io.files import write_text_atomic

__all__ = ["write_report", "render_report", "aggregate", "head_to_head_rows", "NOTES_START", "NOTES_END"]

NOTES_START = "<!-- notes:start -->"
NOTES_END = "<!-- notes:end -->"

_GROUP_KEYS = ("model", "study", "method", "selector", "rule", "level", "uniform_bits", "objective", "qem",
               "qem_reference", "per_channel", "pinned", "act_bits")


# --------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------


def aggregate(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Records grouped over seeds: each group has the shared fields, ``n``, and ``mean``/``std`` per metric."""
    groups: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple(r.get(k) for k in _GROUP_KEYS), []).append(r)
    out = []
    for key, rs in groups.items():
        g = dict(zip(_GROUP_KEYS, key))
        g["n"] = len(rs)
        g["avg_bits"] = rs[0]["avg_bits"]
        g["size_bytes"] = rs[0]["size_bytes"]
        g["target_avg_bits"] = rs[0].get("target_avg_bits")
        g["bits"] = rs[0].get("bits")
        g["seeds"] = sorted(r["seed"] for r in rs)
        g["quant_seconds"] = sum(r["quant_seconds"] for r in rs) / len(rs)
        mean, std = {}, {}
        for m in rs[0]["metrics"]:
            v = [r["metrics"][m] for r in rs]
            mu = sum(v) / len(v)
            mean[m] = mu
            std[m] = math.sqrt(sum((a - mu) ** 2 for a in v) / (len(v) - 1)) if len(v) > 1 else 0.0
        g["mean"], g["std"] = mean, std
        out.append(g)
    return out


def _find(groups: Sequence[Dict[str, Any]], **want: Any) -> List[Dict[str, Any]]:
    return [g for g in groups if all(g.get(k) == v for k, v in want.items())]


def _one(groups: Sequence[Dict[str, Any]], **want: Any) -> Optional[Dict[str, Any]]:
    found = _find(groups, **want)
    return found[0] if found else None


# --------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------


def _metric_cols(model_info: Dict[str, Any]) -> List[Tuple[str, str]]:
    if "top1_views" in model_info.get("fp32", {}):
        n = model_info.get("num_eval", 0)
        return [("top1", "top-1 (centre views)"), ("top1_views", f"top-1 ({n} views)"),
                ("agree", "agreement"), ("kl", "KL")]
    return [("top1", "top-1"), ("agree", "agreement"), ("kl", "KL")]


def _fmt(g: Optional[Dict[str, Any]], metric: str) -> str:
    if g is None:
        return "–"
    mu = g["mean"][metric]
    sd = g["std"][metric]
    if metric == "kl":
        s = f"{mu:.4f}" if mu < 10 else f"{mu:.2f}"
        return s + (f" ± {sd:.4f}" if g["n"] > 1 else "")
    s = f"{100 * mu:.2f}"
    return s + (f" ± {100 * sd:.2f}" if g["n"] > 1 else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cfg_label(g: Dict[str, Any]) -> str:
    if g["selector"] == "uniform":
        return f"uniform {g['uniform_bits']}"
    if g["rule"] == "qem":
        return f"MixQuant QEM {g['qem']:g} ({g['qem_reference']} ref.)"
    obj = "" if g.get("objective") in (None, "norm") else f", {g['objective']}"
    return f"MixQuant (level {g['level']:g}{obj})"


def _calib_count(meta: Dict[str, Any]) -> str:
    from .setups import SCALES

    sc = SCALES.get(meta.get("scale", ""))
    return str(sc.calib) if sc else "the"


def _seconds(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s"


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------


def _points_table(groups, info, study: str, *, act_bits=None, extra_act: Optional[int] = None) -> str:
    """All uniform and MixQuant points of a study, sorted by average bits; optional W/A columns."""
    cols = _metric_cols(info)
    sel = sorted(_find(groups, study=study, act_bits=act_bits), key=lambda g: (g["avg_bits"], g["selector"] != "uniform"))
    header = ["config", "avg bits", "size (KiB)"] + [f"W: {label}" for _, label in cols]
    act_groups = _find(groups, study="asym_a8", act_bits=extra_act) if extra_act else []
    if extra_act:
        header += [f"W/A{extra_act}: {label}" for key, label in cols if key in ("top1", "agree", "kl")]
    rows = []
    for g in sel:
        row = [_cfg_label(g), f"{g['avg_bits']:.3f}", f"{g['size_bytes'] / 1024:.1f}"]
        row += [_fmt(g, k) for k, _ in cols]
        if extra_act:
            a = _one(act_groups, selector=g["selector"], level=g["level"], uniform_bits=g["uniform_bits"])
            row += [_fmt(a, k) for k, _ in cols if k in ("top1", "agree", "kl")]
        rows.append(row)
    return _table(header, rows)


def head_to_head_rows(groups, model: str, study: str, metric: str, act_bits=None) -> List[Dict[str, Any]]:
    """For each MixQuant level of ``study``: the MixQuant group and the uniform group(s) it is compared with."""
    out = []
    mq = sorted(_find(groups, model=model, study=study, selector="mixquant", act_bits=act_bits, objective="norm"),
                key=lambda g: g["level"])
    for g in mq:
        lv = g["level"]
        lo = math.floor(lv)
        brackets = [lo] if lv == lo else [lo, lo + 1]
        unis = [_one(groups, model=model, study=study, selector="uniform", uniform_bits=b, act_bits=act_bits)
                for b in brackets]
        out.append({"level": lv, "mixquant": g, "uniform": unis, "brackets": brackets})
    return out


def interpolated(h: Dict[str, Any], metric: str) -> Optional[float]:
    """The uniform configs' metric at MixQuant's average bits: the value itself for an integer level, else
    interpolated between uniform b and b+1 (linearly for accuracies, geometrically for KL)."""
    unis = h["uniform"]
    if any(u is None for u in unis):
        return None
    if len(unis) == 1:
        return unis[0]["mean"][metric]
    lo, hi = unis
    span = hi["avg_bits"] - lo["avg_bits"]
    t = (h["mixquant"]["avg_bits"] - lo["avg_bits"]) / span if span > 0 else 0.0
    a, b = lo["mean"][metric], hi["mean"][metric]
    if metric == "kl" and a > 0 and b > 0:
        return math.exp(math.log(a) + t * (math.log(b) - math.log(a)))
    return a + t * (b - a)


def _fmt_value(v: Optional[float], metric: str) -> str:
    if v is None:
        return "–"
    return f"{v:.4f}" if metric == "kl" else f"{100 * v:.2f}"


def _h2h_table(groups, models_info, study: str, act_of=lambda info: None) -> str:
    header = ["model", "level", "MixQuant avg bits", "compared with (avg bits)", "metric", "uniform",
              "uniform at MixQuant's avg", "MixQuant", "MixQuant − uniform"]
    rows = []
    for model, info in models_info.items():
        metrics = ["top1", "agree", "kl"] if "top1_views" not in info["fp32"] else ["top1", "top1_views", "agree", "kl"]
        for h in head_to_head_rows(groups, model, study, info.get("primary", "top1"), act_bits=act_of(info)):
            g = h["mixquant"]
            comp = ", ".join(f"u{b} ({u['avg_bits']:.3f})" if u else f"u{b} (–)" for b, u in zip(h["brackets"], h["uniform"]))
            for m in metrics:
                uni = " / ".join(_fmt(u, m) for u in h["uniform"])
                ref = interpolated(h, m)
                if ref is None:
                    delta = "–"
                elif m == "kl":
                    delta = f"{g['mean'][m] - ref:+.4f}"
                else:
                    delta = f"{100 * (g['mean'][m] - ref):+.2f}"
                interp = _fmt_value(ref, m) if len(h["uniform"]) > 1 else "(same)"
                rows.append([model, f"{h['level']:g}", f"{g['avg_bits']:.3f}", comp, m, uni, interp, _fmt(g, m), delta])
    return _table(header, rows)


def _objective_table(groups, models_info) -> str:
    header = ["model", "layers", "level", "avg bits", "metric", "norm", "mse", "sse"]
    rows = []
    for model, info in models_info.items():
        primary = info.get("primary", "top1")
        for pinned in (True, False):
            study = "asym" if pinned else "free"
            levels = sorted({g["level"] for g in _find(groups, model=model, study="objective", pinned=pinned)})
            for lv in levels:
                cells = {}
                for obj in ("norm", "mse", "sse"):
                    st = study if obj == "norm" else "objective"
                    cells[obj] = _one(groups, model=model, study=st, selector="mixquant", level=lv, objective=obj,
                                      pinned=pinned, per_channel=True, act_bits=None)
                avg = next((c["avg_bits"] for c in cells.values() if c), float("nan"))
                for m in (primary, "kl"):
                    best = None
                    vals = {o: c["mean"][m] for o, c in cells.items() if c}
                    if vals:
                        best = (min if m == "kl" else max)(vals.values())
                    row = [model, "first/last 8" if pinned else "all free", f"{lv:g}", f"{avg:.3f}", m]
                    for obj in ("norm", "mse", "sse"):
                        c = cells[obj]
                        s = _fmt(c, m)
                        if c is not None and best is not None and c["mean"][m] == best:
                            s = f"**{s}**"
                        row.append(s)
                    rows.append(row)
    return _table(header, rows)


def objective_score(groups) -> Dict[str, Dict[str, int]]:
    """How often each objective is best (ties count for each) on the primary metric and on KL."""
    score = {o: {"primary": 0, "kl": 0, "cells": 0} for o in ("norm", "mse", "sse")}
    models = sorted({g["model"] for g in groups})
    for model in models:
        for pinned in (True, False):
            study = "asym" if pinned else "free"
            for lv in sorted({g["level"] for g in _find(groups, model=model, study="objective", pinned=pinned)}):
                cells = {}
                for obj in ("norm", "mse", "sse"):
                    st = study if obj == "norm" else "objective"
                    c = _one(groups, model=model, study=st, selector="mixquant", level=lv, objective=obj,
                             pinned=pinned, per_channel=True, act_bits=None)
                    if c:
                        cells[obj] = c
                if len(cells) < 3:
                    continue
                for key, pick in (("primary", max), ("kl", min)):
                    metric = "kl" if key == "kl" else ("agree" if "top1_views" in cells["norm"]["mean"] else "top1")
                    best = pick(c["mean"][metric] for c in cells.values())
                    for o, c in cells.items():
                        if c["mean"][metric] == best:
                            score[o][key] += 1
                for o in cells:
                    score[o]["cells"] += 1
    return score


def _qem_table(groups, info, model) -> str:
    cols = _metric_cols(info)
    sel = sorted(_find(groups, model=model, study="qem"), key=lambda g: (g["qem_reference"], g["qem"]))
    uni = sorted(_find(groups, model=model, study="asym", selector="uniform"), key=lambda g: g["avg_bits"])
    header = ["config", "avg bits", "size (KiB)", "bits used"] + [label for _, label in cols] + ["uniform of ≥ size"]
    rows = []
    primary = info.get("primary", "top1")
    for g in sel:
        used = sorted(set(g["bits"].values())) if g.get("bits") else []
        bigger = [u for u in uni if u["size_bytes"] >= g["size_bytes"]]
        ref = bigger[0] if bigger else None
        ref_s = f"u{ref['uniform_bits']}: {_fmt(ref, primary)}" if ref else "–"
        rows.append([_cfg_label(g), f"{g['avg_bits']:.3f}", f"{g['size_bytes'] / 1024:.1f}",
                     ",".join(map(str, used))] + [_fmt(g, k) for k, _ in cols] + [ref_s])
    return _table(header, rows)


def _brecq_table(groups, info, model) -> str:
    cols = [c for c in _metric_cols(info) if c[0] != "top1_views"]
    sel = sorted(_find(groups, model=model, method="brecq"),
                 key=lambda g: (g["act_bits"] or 0, g["avg_bits"], g["selector"] != "uniform"))
    header = ["config", "activations", "avg bits", "seeds"] + [label for _, label in cols] + ["quantize time"]
    rows = []
    for g in sel:
        rows.append([_cfg_label(g), f"{g['act_bits']} bits" if g["act_bits"] else "float", f"{g['avg_bits']:.3f}",
                     str(g["n"])] + [_fmt(g, k) for k, _ in cols] + [_seconds(g["quant_seconds"])])
    return _table(header, rows)


# --------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------


def _existing_notes(path: str) -> Optional[str]:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    m = re.search(re.escape(NOTES_START) + r"\n?(.*?)\n?" + re.escape(NOTES_END), text, re.S)
    return m.group(1) if m else None


def render_report(results: Dict[str, Any], img_rel: str = "img", notes: Optional[str] = None,
                  plots: Optional[Dict[str, Dict[str, str]]] = None) -> str:
    """The markdown text of the report."""
    meta = results["meta"]
    info_all = results["models"]
    groups = aggregate(results["records"])
    mach = meta.get("machine", {})
    out: List[str] = []
    w = out.append
    w("# Results: MixQuant against uniform bit-widths on real models\n")
    w("Generated by `mixquant experiment` from `docs/results.json`; every number below is in that file.\n")
    w("## How this was run\n")
    total = meta.get("seconds")
    per = ", ".join(f"{m} {_seconds(s)}" for m, s in meta.get("seconds_per_model", {}).items())
    if meta.get("parts"):
        w(f"- Commands (scale `{meta['scale']}`, seeds {', '.join(map(str, meta['seeds']))}; methods "
          f"{', '.join(meta['methods'])}); the models ran as separate processes, merged with "
          "`mixquant experiment --report-only A.json B.json ...`:")
        import datetime as _dt

        ends = []
        for part in meta["parts"]:
            w(f"  - `{part['command']}`: started {part['started']}, {_seconds(part['seconds'] or 0)}"
              + ("" if part.get("finished") else " (stopped once the models reported here had finished)"))
            try:
                ends.append(_dt.datetime.fromisoformat(part["started"]) + _dt.timedelta(seconds=part["seconds"] or 0))
            except (TypeError, ValueError):
                pass
        try:
            first = min(_dt.datetime.fromisoformat(p["started"]) for p in meta["parts"])
            wall = f"; {_seconds((max(ends) - first).total_seconds())} of wall-clock time from the first start to the last end (parts overlapped)"
        except (TypeError, ValueError):
            wall = ""
        w(f"- Run time: {_seconds(total) if total else '–'} of compute summed over the models ({per}){wall}.")
    else:
        w(f"- Command: `{meta.get('command') or 'mixquant experiment'}` (scale `{meta['scale']}`, seeds "
          f"{', '.join(map(str, meta['seeds']))}; models {', '.join(meta['models'])}; methods "
          f"{', '.join(meta['methods'])}).")
        w(f"- Run time: {_seconds(total) if total else '–'} in total ({per}); started {meta.get('started')}"
          f"{'' if meta.get('finished') else ' (the run did not finish: partial results)'}.")
    w(f"- Machine: {mach.get('cpu')}, {mach.get('logical_cpus')} logical CPUs ({mach.get('torch_threads')} torch "
      f"threads), {mach.get('memory_gib')} GiB, shared with other jobs while it ran; Python {mach.get('python')}, "
      f"torch {mach.get('torch')}, mixquant {mach.get('mixquant')} (SIMD {mach.get('simd')}). CPU only.")
    w("")
    w("## Protocol\n")
    w("- **Same average.** Every MixQuant config is compared at an equal parameter-weighted average weight "
      "bit-width (the budget rule, `mixquant.search(..., avg_bits=...)`). A *level* `b` (an integer) compares "
      "uniform `b` with MixQuant at exactly uniform `b`'s average. Uniform configs at non-integer widths do not "
      "exist, so a level `b + 0.5` puts MixQuant's budget half-way between the averages of uniform `b` and uniform "
      "`b + 1` and compares it with both (it is bigger than the first and smaller than the second). The budget is "
      "an upper bound: with few, unequal layers the search may not be able to spend all of it, so MixQuant's "
      "actual average (reported) can be below the target.")
    w("- **First and last layer at 8 bits for everyone** (the BRECQ convention) in all studies except "
      "\"all layers free\"; they count toward the average. For MobileNetV2 the last layer (the 1280x1000 "
      "classifier) holds 37 % of the weights, so \"uniform 3\" there means an average of 4.85 bits; the "
      "\"all layers free\" study shows the other convention (uniform `b` is exactly `b` bits).")
    w("- MixQuant's candidate bit-widths are 2..8; the budget rule's objective is `norm` (the current default) "
      "unless a table says otherwise; weights are quantized per output channel unless a table says per-tensor. "
      "The search reads the weights only (min/max asymmetric roundoff error).")
    w("- Vanilla asymmetric = round-to-nearest with min/max ranges (`mixquant.quantize(..., 'asymmetric')`); "
      "\"W/A8\" adds 8-bit activations (min/max ranges over "
      f"{_calib_count(meta)} calibration samples; the model input at 8 bits). BRECQ uses the first "
      "`num_samples` of the same calibration draw.")
    opts = {m: i.get("brecq_options") for m, i in info_all.items()}
    w("- BRECQ (`mixquant.quantize(..., 'brecq')`: BN folding, block reconstruction with AdaRound, LSQ activation "
      "step sizes, first/last layer 8 bits) at CPU-sized settings: "
      + "; ".join(f"{m}: {o.get('iters')} iterations per unit, batch {o.get('batch_size')}, "
                  f"{o.get('num_samples')} calibration samples, activations {info_all[m].get('brecq_act_bits')} bits "
                  f"with {o.get('act_iters')} step-size iterations per unit" for m, o in opts.items() if o)
      + ". The paper's setting is 20,000 iterations per block on 1,024 images; at a few hundred iterations "
      "AdaRound moves little from its initialisation (clipping-searched scales, p = 2.4), so these BRECQ numbers "
      "measure that initialisation plus a short reconstruction.")
    w("- Seeds change the calibration draw and BRECQ's batch order; asymmetric weight-only quantization is "
      "deterministic (one run). Cells with more than one seed show mean ± sample standard deviation.")
    w("- Metrics: top-1 accuracy (%), top-1 agreement with the FP32 model (%), and the mean KL divergence "
      "KL(FP32 || quantized) of the softmax outputs (nats).")
    w("")
    w("Data (calibration kept apart from evaluation):\n")
    for m, i in info_all.items():
        fp = i["fp32"]
        w(f"- **{m}** — {i['title']}. Evaluation: {i['eval_data']}. Calibration: {i['calib']}. "
          f"FP32: " + ", ".join(f"{k} {100 * v:.2f} %" for k, v in fp.items() if k != "kl") +
          f". First/last layers: `{i['pinned_layers'][0]}`, `{i['pinned_layers'][1]}`.")
    w("")
    w("## Findings\n")
    w(NOTES_START)
    w(notes.strip("\n") if notes else "_(No notes yet: the tables below are complete.)_")
    w(NOTES_END)
    w("")
    w("## Claim 1: MixQuant + vanilla asymmetric vs vanilla asymmetric (same average bits)\n")
    w("Weights only, per-channel, first/last layer 8 bits. For a level `b + 0.5` the uniform column gives "
      "`uniform b / uniform b+1`, and the next column interpolates them to MixQuant's actual average (linearly for "
      "accuracy and agreement, geometrically for KL): the straight line between the two uniform points on the "
      "Pareto plot. The difference column is MixQuant minus that reference (for KL, lower is better).\n")
    w(_h2h_table(groups, info_all, "asym"))
    w("\nWith 8-bit activations (W/A8):\n")
    w(_h2h_table(groups, info_all, "asym_a8", act_of=lambda i: 8))
    w("")
    w("## Claim 2: MixQuant + BRECQ vs BRECQ (same average bits)\n")
    w("Weights only:\n")
    w(_h2h_table(groups, info_all, "brecq"))
    w("\nWith quantized activations:\n")
    w(_h2h_table(groups, info_all, "brecq_act", act_of=lambda i: i.get("brecq_act_bits")))
    w("")
    w("## The budget rule's objective (norm / mse / sse)\n")
    w("Vanilla asymmetric, weights only, per-channel; the best value of each row in bold. `norm` sums each layer's "
      "error divided by its weight energy (1/SQNR), `mse` sums per-layer mean squared errors, `sse` sums squared "
      "errors (large layers dominate).\n")
    w(_objective_table(groups, info_all))
    sc = objective_score(groups)
    w("\nBest-or-tied counts over those rows (primary metric / KL): "
      + ", ".join(f"{o}: {v['primary']} / {v['kl']} of {v['cells']}" for o, v in sc.items()) + ".\n")
    for m, i in info_all.items():
        w(f"## {m}: all numbers\n")
        w(f"{i['title']}. FP32: " + ", ".join(
            f"{k} {i['fp32'][k]:.4f}" if k == "kl" else f"{k} {100 * i['fp32'][k]:.2f} %" for k in i["fp32"]) + ".\n")
        if plots and m in plots:
            for kind, cap in (("pareto", "accuracy / KL against average bits"),
                              ("allocation", "MixQuant's per-layer bits"),
                              ("heatmap", "roundoff error, layers x bit-widths")):
                if kind in plots[m]:
                    w(f"![{m}: {cap}]({img_rel}/{os.path.basename(plots[m][kind])})\n")
        if _find(groups, model=m, study="asym"):
            w("**Vanilla asymmetric, per-channel, first/last 8 bits** (W = weights only; W/A8 = with 8-bit "
              "activations):\n")
            w(_points_table([g for g in groups if g["model"] == m], i, "asym", extra_act=8))
            w("")
        if _find(groups, model=m, study="per_tensor"):
            w("**Vanilla asymmetric, per-tensor** (search and quantizer per-tensor), weights only:\n")
            w(_points_table([g for g in groups if g["model"] == m], i, "per_tensor"))
            w("")
        if _find(groups, model=m, study="free"):
            w("**Vanilla asymmetric, all layers free** (no pinned layer; uniform `b` is exactly `b` bits), "
              "weights only:\n")
            w(_points_table([g for g in groups if g["model"] == m], i, "free"))
            w("")
        if _find(groups, model=m, study="qem"):
            w("**QEM rule** (the paper's rule; first/last 8, per-channel, weights only, vanilla asymmetric). "
              "`layer ref.`: each layer's own error at 8 bits is the reference; `model ref.`: the median "
              "normalised error over layers at 8 bits. The last column is the smallest uniform config at least "
              "as large:\n")
            w(_qem_table(groups, i, m))
            w("")
        if _find(groups, model=m, method="brecq"):
            w("**BRECQ** (per-channel, first/last 8):\n")
            w(_brecq_table(groups, i, m))
            w("")
    return "\n".join(out) + "\n"


def write_report(results: Dict[str, Any], out_dir: str, *, report_name: str = "RESULTS.md",
                 json_name: Optional[str] = "results.json", img_dir: str = "img", plots: bool = True,
                 notes: Optional[str] = None) -> Dict[str, Any]:
    """Write the markdown report, the JSON and (``plots``) the PNG plots under ``out_dir``.

    Returns ``{"report": path, "json": path or None, "plots": {model: {kind: path}}}``. Notes already in an
    existing report are kept unless ``notes`` is given.
    """
    from .runner import save_results

    os.makedirs(out_dir, exist_ok=True)
    report_path = os.path.join(out_dir, report_name)
    json_path = os.path.join(out_dir, json_name) if json_name else None
    if json_path:
        save_results(results, json_path)
    made: Dict[str, Dict[str, str]] = {}
    if plots:
        from .plots import write_model_plots

        made = write_model_plots(results, os.path.join(out_dir, img_dir))
    if notes is None:
        notes = _existing_notes(report_path)
    text = render_report(results, img_rel=img_dir, notes=notes, plots=made)
    write_text_atomic(report_path, text, overwrite=True)  # the caller decided whether to replace a report
    return {"report": report_path, "json": json_path, "plots": made}
