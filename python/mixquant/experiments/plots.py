"""PNG plots of experiment results (matplotlib, installed with ``pip install mixquant[report]``).

* :func:`pareto_plot`: accuracy (or agreement) and KL against average weight bits, per method;
* :func:`allocation_plot`: MixQuant's per-layer bit-widths at each compared average;
* :func:`heatmap_plot`: the layers x bit-widths roundoff-error table the search reads;
* :func:`comparison_plot`, :func:`bits_curve_plot`: the demo's bars and its accuracy-against-bits curve.

Every plot names a model by :func:`~mixquant.experiments.names.display_name`, and
tick labels stay at 8 pt or more (figures grow with the number of layers instead).
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Dict, List, Sequence, Tuple

from ..io.files import write_bytes_atomic
from .names import display_name

__all__ = ["require_matplotlib", "pareto_plot", "allocation_plot", "heatmap_plot", "comparison_plot", "bits_curve_plot",
           "write_model_plots", "is_png", "PNG_SIGNATURE", "TICK_PT"]

#: Smallest font of any tick label or legend (pt).
TICK_PT = 8

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

METRIC_LABELS = {
    "top1": "top-1 accuracy",
    "top1_views": "top-1 accuracy (all views)",
    "agree": "top-1 agreement with FP32",
    "kl": "KL(FP32 || quantized), nats",
}


def require_matplotlib():
    """Import matplotlib with the non-interactive Agg backend; a clear ImportError if it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "plots need matplotlib, which is not installed: pip install 'mixquant[report]' (or pip install matplotlib)"
        ) from exc
    return plt


def _select(records: Sequence[Dict[str, Any]], **want: Any) -> List[Dict[str, Any]]:
    return [r for r in records if all(r.get(k) == v for k, v in want.items())]


def _mean_by_avg(records: Sequence[Dict[str, Any]], metric: str) -> Tuple[List[float], List[float], List[float]]:
    """(avg bits, mean, std) over seeds, grouped by the config's average bits."""
    groups: Dict[float, List[float]] = {}
    for r in records:
        groups.setdefault(round(r["avg_bits"], 6), []).append(r["metrics"][metric])
    xs = sorted(groups)
    means, stds = [], []
    for x in xs:
        v = groups[x]
        m = sum(v) / len(v)
        means.append(m)
        stds.append(math.sqrt(sum((a - m) ** 2 for a in v) / (len(v) - 1)) if len(v) > 1 else 0.0)
    return xs, means, stds


def pareto_plot(model: str, info: Dict[str, Any], records: Sequence[Dict[str, Any]], path: str) -> str:
    """Primary metric and KL against average weight bits for every method of ``model``; writes ``path``."""
    plt = require_matplotlib()
    recs = [r for r in records if r["model"] == model]
    primary = info.get("primary", "top1")
    series = [
        ("uniform, asymmetric", dict(study="asym", selector="uniform"), dict(color="0.35", marker="o", ls="-")),
        ("MixQuant budget, asymmetric", dict(study="asym", selector="mixquant"), dict(color="C0", marker="s", ls="-")),
        ("MixQuant QEM (layer ref.), asymmetric", dict(study="qem", qem_reference="layer"),
         dict(color="C2", marker="x", ls=":")),
        ("MixQuant QEM (model ref.), asymmetric", dict(study="qem", qem_reference="model"),
         dict(color="C4", marker="+", ls=":")),
        ("uniform, asymmetric, all layers free", dict(study="free", selector="uniform"),
         dict(color="0.6", marker="o", ls="--", mfc="none")),
        ("MixQuant, asymmetric, all layers free", dict(study="free", selector="mixquant"),
         dict(color="C9", marker="s", ls="--", mfc="none")),
        ("uniform, BRECQ", dict(study="brecq", selector="uniform"), dict(color="C3", marker="^", ls="-")),
        ("MixQuant, BRECQ", dict(study="brecq", selector="mixquant"), dict(color="C1", marker="v", ls="-")),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for label, want, style in series:
        sel = _select(recs, **want)
        if not sel:
            continue
        for ax, metric in zip(axes, (primary, "kl")):
            xs, ms, ss = _mean_by_avg(sel, metric)
            if metric == "kl":
                ms = [max(m, 1e-5) for m in ms]
            if any(s > 0 for s in ss):
                ax.errorbar(xs, ms, yerr=ss, label=label, capsize=3, **style)
            else:
                ax.plot(xs, ms, label=label, **style)
    fp = info.get("fp32", {}).get(primary)
    if fp is not None:
        axes[0].axhline(fp, color="k", lw=0.8, ls="-.", label="FP32")
    axes[0].set_ylabel(METRIC_LABELS.get(primary, primary))
    axes[1].set_ylabel(METRIC_LABELS["kl"])
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("average weight bits (parameter-weighted)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=TICK_PT, loc="lower right")
    fig.suptitle(f"{display_name(model)}: weight-only quantization, per-channel", fontsize=11)
    fig.tight_layout()
    return _save(fig, plt, path)


def allocation_plot(model: str, info: Dict[str, Any], records: Sequence[Dict[str, Any]], path: str,
                    study: str = "asym", pinned_note: str = "first/last layer pinned at 8") -> str:
    """MixQuant's bit-width per layer at each head-to-head level (bars), with layer sizes below."""
    plt = require_matplotlib()
    layers = info["layers"]
    names = [l["name"] for l in layers]
    levels = sorted({r["level"] for r in records
                     if r["model"] == model and r["study"] == study and r["selector"] == "mixquant" and r.get("bits")
                     and r["level"] in set(float(v) for v in info.get("levels", []))})
    if not levels:  # fall back to whatever MixQuant configs exist
        levels = sorted({r["level"] for r in records if r["model"] == model and r["selector"] == "mixquant"
                         and r.get("bits") and r["level"] is not None})
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(8, 0.2 * len(names) + 3), 7.5), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1.2]})
    width = 0.8 / max(1, len(levels))
    for i, level in enumerate(levels):
        rec = next(r for r in records if r["model"] == model and r["study"] == study and r["selector"] == "mixquant"
                   and r["level"] == level and r.get("bits"))
        ys = [rec["bits"].get(n, 0) for n in names]
        xs = [j + (i - (len(levels) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, ys, width=width, label=f"MixQuant, average {rec['avg_bits']:.2f} bits (level {level:g})",
               color=f"C{i}")
    ax.set_ylabel("weight bits")
    ax.set_ylim(0, 8.8)
    ax.set_yticks(range(0, 9))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=TICK_PT, loc="upper left")
    ax.set_title(f"{display_name(model)}: MixQuant's per-layer bit-widths "
                 f"(budget rule, per-channel; {pinned_note})", fontsize=11)
    ax2.bar(range(len(names)), [l["params"] for l in layers], color="0.5")
    ax2.set_yscale("log")
    ax2.set_ylabel("weights")
    ax2.set_xticks(range(len(names)))
    ax2.set_xticklabels(names, rotation=90, fontsize=TICK_PT)
    fig.tight_layout()
    return _save(fig, plt, path)


def heatmap_plot(model: str, info: Dict[str, Any], records: Sequence[Dict[str, Any]], path: str) -> str:
    """log10 of each layer's normalised roundoff error (1/SQNR) at each bit-width, MixQuant's picks marked."""
    plt = require_matplotlib()
    import numpy as np

    errors = info["errors_per_channel"]
    names = [l["name"] for l in info["layers"] if l["name"] in errors]
    bits = errors[names[0]]["bits"]
    grid = np.array([[math.log10(max(v, 1e-12)) for v in errors[n]["norm"]] for n in names])
    fig, ax = plt.subplots(figsize=(7, max(3.5, 0.17 * len(names) + 2)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis_r")
    ax.set_xticks(range(len(bits)))
    ax.set_xticklabels([str(b) for b in bits])
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=TICK_PT)
    ax.set_xlabel("weight bits")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("log10 normalised roundoff error  sum((w-q(w))^2) / sum(w^2)")
    levels = [float(v) for v in info.get("levels", [])]
    marks = ("o", "x", "^", "s")
    for i, level in enumerate(levels):
        rec = next((r for r in records if r["model"] == model and r["study"] == "asym" and r["selector"] == "mixquant"
                    and r["level"] == level and r.get("bits")), None)
        if rec is None:
            continue
        xs = [bits.index(rec["bits"][n]) for n in names if rec["bits"].get(n) in bits]
        ys = [j for j, n in enumerate(names) if rec["bits"].get(n) in bits]
        mark = marks[i % len(marks)]
        if mark == "x":
            ax.scatter(xs, ys, marker=mark, c="w", s=28, label=f"MixQuant at {rec['avg_bits']:.2f} avg bits")
        else:
            ax.scatter(xs, ys, marker=mark, facecolors="none", edgecolors="w", s=28,
                       label=f"MixQuant at {rec['avg_bits']:.2f} avg bits")
    if levels:
        ax.legend(fontsize=TICK_PT, loc="upper center", bbox_to_anchor=(0.5, -0.07 - 1.2 / max(len(names), 4)),
                  ncol=2, facecolor="0.3", labelcolor="w")
    ax.set_title(f"{display_name(model)}: per-channel asymmetric roundoff error", fontsize=11)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    write_bytes_atomic(path, buf.getvalue(), overwrite=True)  # a plot belongs to its report: replaced with it
    return path


def write_model_plots(results: Dict[str, Any], img_dir: str, prefix: str = "") -> Dict[str, Dict[str, str]]:
    """All three plots for every model in ``results``; returns {model: {kind: path}}."""
    out: Dict[str, Dict[str, str]] = {}
    for model, info in results["models"].items():
        recs = [r for r in results["records"] if r["model"] == model]
        paths: Dict[str, str] = {}
        if any(r["study"] in ("asym", "brecq", "qem") for r in recs):
            paths["pareto"] = pareto_plot(model, info, recs, os.path.join(img_dir, f"{prefix}pareto_{model}.png"))
        if any(r["selector"] == "mixquant" and r.get("bits") for r in recs):
            paths["allocation"] = allocation_plot(model, info, recs,
                                                  os.path.join(img_dir, f"{prefix}bits_{model}.png"))
        paths["heatmap"] = heatmap_plot(model, info, recs, os.path.join(img_dir, f"{prefix}errors_{model}.png"))
        out[model] = paths
    return out


def is_png(path: str, min_bytes: int = 2000) -> bool:
    """True when ``path`` starts with the PNG signature and is larger than ``min_bytes``."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
        return head == PNG_SIGNATURE and os.path.getsize(path) > min_bytes
    except OSError:
        return False


def comparison_plot(runs: Sequence[Dict[str, Any]], fp: Dict[str, float], path: str, title: str = "") -> str:
    """Bars of agreement and top-1 (all views) per quantized model, and their KL (demo report)."""
    plt = require_matplotlib()
    labels = [f"{r['method']}\n{r['config']}\n{r['avg_bits']:.2f} bits" for r in runs]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(runs) + 4), 4.2))
    xs = range(len(runs))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], [100 * r["metrics"]["agree"] for r in runs], w, label="agreement with FP32")
    ax.bar([x + w / 2 for x in xs], [100 * r["metrics"]["top1_views"] for r in runs], w, label="top-1 (all views)")
    ax.axhline(100 * fp["top1_views"], color="k", ls="-.", lw=0.8, label="FP32 top-1")
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=TICK_PT + 1)
    ax.legend(fontsize=TICK_PT)
    ax2.bar(list(xs), [max(r["metrics"]["kl"], 1e-5) for r in runs], 0.6, color="C3")
    ax2.set_yscale("log")
    ax2.set_ylabel("KL(FP32 || quantized), nats")
    ax2.set_xticks(list(xs))
    ax2.set_xticklabels(labels, fontsize=TICK_PT + 1)
    for a in (ax, ax2):
        a.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, plt, path)


def bits_curve_plot(points: Sequence[Dict[str, Any]], fp: Dict[str, float], path: str, title: str = "") -> str:
    """Agreement with FP32 and KL against average weight bits, one line per selector (demo report)."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    styles = {"uniform": dict(color="0.35", marker="o"), "MixQuant": dict(color="C0", marker="s")}
    for selector, style in styles.items():
        sel = sorted((p for p in points if p["selector"] == selector), key=lambda p: p["avg_bits"])
        if not sel:
            continue
        xs = [p["avg_bits"] for p in sel]
        axes[0].plot(xs, [100 * p["metrics"]["agree"] for p in sel], label=selector, **style)
        axes[1].plot(xs, [max(p["metrics"]["kl"], 1e-5) for p in sel], label=selector, **style)
    axes[0].set_ylabel("top-1 agreement with FP32, %")
    axes[0].set_ylim(0, 105)
    axes[1].set_ylabel(METRIC_LABELS["kl"])
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("average weight bits (parameter-weighted)")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=TICK_PT + 1)
        ax.legend(fontsize=TICK_PT + 1)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, plt, path)
