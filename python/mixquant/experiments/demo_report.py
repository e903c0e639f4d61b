"""The demo's printed table and its report folder's ``report.md`` / ``report.json`` text."""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Sequence

__all__ = ["results_table", "layer_table", "markdown", "tidy", "dumps"]


def tidy(value: Any, digits: int = 6) -> Any:
    """``value`` with every float rounded to ``digits`` significant digits (float32 sums carry no more)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: tidy(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [tidy(v, digits) for v in value]
    return value


def dumps(report: Dict[str, Any]) -> str:
    """``report.json``'s text: tidy floats, NaN written as null (JSON has no NaN)."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(tidy(report)), indent=1) + "\n"


def _columns(rows: List[Sequence[str]], left: int = 2) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def results_table(runs: Sequence[Dict[str, Any]], fp: Dict[str, float], photos: int, views: int,
                  fp32_bytes: int) -> str:
    """One row per quantized model and one for FP32: bits, size and how many times smaller, accuracy, fidelity."""
    rows = [("method", "config", "avg bits", "KiB", "x smaller", f"top-1 /{photos}", f"top-1 ({views} views)",
             "agreement", "KL")]
    rows.append(("FP32", "-", "32", f"{fp32_bytes / 1024:.0f}", "1.0", f"{fp['top1'] * photos:.0f}",
                 f"{100 * fp['top1_views']:.1f} %", "100.0 %", "0"))
    for r in runs:
        m = r["metrics"]
        rows.append((r["method"], r["config"], f"{r['avg_bits']:.3f}", f"{r['size_bytes'] / 1024:.0f}",
                     f"{fp32_bytes / r['size_bytes']:.1f}", f"{m['top1'] * photos:.0f}",
                     f"{100 * m['top1_views']:.1f} %", f"{100 * m['agree']:.1f} %", f"{m['kl']:.3f}"))
    return _columns(rows)


def layer_table(layers: Sequence[Dict[str, Any]], uniform_bits: int) -> str:
    """MixQuant's bits per layer with the layer's size and its normalised error at those bits and at uniform bits."""
    rows = [("layer", "weights", "MixQuant bits", "error (norm)", f"error at {uniform_bits} bits")]
    for layer in layers:
        rows.append((layer["name"], str(layer["params"]), str(layer["bits"]), f"{layer['norm']:.3g}",
                     f"{layer['norm_uniform']:.3g}" if layer.get("norm_uniform") is not None else "-"))
    return _columns(rows, left=1)


def markdown(report: Dict[str, Any], table: str) -> str:
    s = report["settings"]
    b = s["brecq"]
    t = report["timings_s"]
    mach = report["machine"]
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in t.items() if k != "total")
    lines = [
        "# mixquant demo report",
        "",
        f"MobileNetV2 (torchvision's ImageNet weights), MixQuant at an average of {report['avg_bits']:g} weight "
        "bits against the uniform bit-width(s) of the same average, quantized with vanilla asymmetric "
        "round-to-nearest and with BRECQ. Every layer is free (none is pinned), so the averages compare directly. "
        "Sizes count the packed weights plus their scales and zero points (`BitConfig.size_bytes`); FP32 is the "
        "same layers' weights in float32.",
        "",
        f"- Evaluation: {s['eval_images']} images = {s['photos']} labelled photos x {s['views']} views "
        f"({report['data']['evaluation']}), {s['image_size']} px.",
        f"- Calibration: {s['calib_images']} {report['data']['calibration']}.",
        f"- BRECQ preset: {b['iters']} iterations per unit, batch {b['batch_size']}, {b['num_samples']} "
        f"calibration crops, {b.get('num_threads') or 'default'} thread(s) (the paper uses 20,000 iterations on "
        "1,024 images).",
        f"- Time: {t['total']:.0f} s ({steps}).",
        "",
        "```",
        table,
        "```",
        "",
        "top-1: on the centre view of each labelled photo; agreement: share of views where the quantized model's "
        "top class equals the FP32 model's; KL: mean KL(FP32 || quantized) of the softmax outputs, in nats.",
        "",
        "![comparison](comparison.png)",
        "",
        "## Accuracy against average bits",
        "",
        "Vanilla asymmetric quantization at several averages: uniform bit-widths and MixQuant's budget rule, "
        f"measured on {report['curve_images']} of the images (the first views of each photo).",
        "",
        "![agreement and KL against average weight bits](curve.png)",
        "",
        "## MixQuant's bits per layer",
        "",
        "![MixQuant's per-layer bits](bits.png)",
        "",
        "![roundoff error per layer and bit-width](errors.png)",
        "",
        "```",
        report["layer_table"],
        "```",
        "",
        "`bits.json` holds MixQuant's bit config (`mixquant.BitConfig.load('bits.json')`).",
        "",
    ]
    if report.get("brecq_tables"):
        lines += ["## BRECQ, unit by unit", "",
                  "Each unit's reconstruction loss before (round to nearest) and after AdaRound; time per iteration "
                  "and the size of its cached inputs and targets.", ""]
        for label, text in report["brecq_tables"].items():
            lines += [f"### {label}", "", "```", text, "```", ""]
    lines += [
        "## Machine",
        "",
        f"mixquant {mach['mixquant']}, torch {mach['torch']}, Python {mach['python']}; {mach['cpu']}, "
        f"{mach['logical_cpus']} logical CPUs, {mach['torch_threads']} torch thread(s), SIMD {mach['simd']}, "
        f"{mach['memory_gib']} GiB; {mach['platform']}. Load average (1/5/15 min) at the start "
        f"{report['load_average']['start']}, at the end {report['load_average']['end']}: times on a shared "
        "machine are longer than on an idle one.",
        "",
    ]
    return "\n".join(lines)
