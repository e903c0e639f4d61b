"""``mixquant demo``: the whole pipeline on MobileNetV2 and real photos, in a few minutes on a laptop CPU.

Steps: load MobileNetV2 (torchvision's ImageNet weights) and the offline photos →
MixQuant search at an average weight bit-width → quantize with vanilla
asymmetric round-to-nearest and with BRECQ (a CPU-sized preset), next to the
uniform bit-width(s) of the same average → evaluate against the labels and
against the FP32 model → print a table → write a report folder:

* ``report.md``: the table, the settings, where the data came from;
* ``report.json``: every number and setting;
* ``bits.json``: MixQuant's bit config (``mixquant.BitConfig.load``);
* ``comparison.png``, ``bits.png``, ``errors.png``: plots.

Calibration uses crops of scikit-image's natural photos; evaluation uses
foolbox's 20 labelled ImageNet photos (10 views each: five crops and their mirror images),
so the two never overlap.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from .names import DEMO_OUT

__all__ = ["DemoSettings", "run_demo", "REPORT_FILES", "DEFAULT_OUT"]

DEFAULT_OUT = DEMO_OUT
REPORT_FILES = ("report.md", "report.json", "bits.json", "comparison.png", "bits.png", "errors.png")


@dataclass
class DemoSettings:
    """Sizes of a demo run (``quick`` for tests, default for people)."""

    avg_bits: float = 4.0
    photos: Optional[int] = None  # labelled photos used (None: all 20)
    views: int = 10  # grid views per photo
    calib: int = 32  # calibration crops
    resize: int = 256
    size: int = 224
    brecq: Dict[str, Any] = field(default_factory=lambda: {
        "iters": 40, "batch_size": 8, "num_samples": 32, "num_threads": 1,
    })

    @classmethod
    def quick(cls, avg_bits: float = 4.0) -> "DemoSettings":
        return cls(avg_bits=avg_bits, photos=3, views=2, calib=8, resize=128, size=112,
                   brecq={"iters": 2, "batch_size": 4, "num_samples": 8, "num_threads": 1})


def calibration_crops(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` random-resized ``size`` px crops of scikit-image's photos, interleaved so any prefix covers every photo."""
    from mixquant import zoo

    photos = zoo.unlabelled_photos()
    per = -(-n // len(photos))
    views = [zoo.imagenet_crops(img, n=per, mode="random", seed=1000 * seed + i, size=size)
             for i, (img, _) in enumerate(photos)]
    return torch.stack(views, 1).reshape(-1, *views[0].shape[1:])[:n].contiguous()


def _check_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise FileExistsError(f"{out!r} exists and is not a folder")
        existing = [f for f in REPORT_FILES if os.path.exists(os.path.join(out, f))]
        if existing and not overwrite:
            raise FileExistsError(f"{out!r} already holds a report ({', '.join(existing)}); pass --overwrite "
                                  "to replace it, or choose another --out")


def _metrics(logits: torch.Tensor, fp: torch.Tensor, y: torch.Tensor, center: torch.Tensor) -> Dict[str, float]:
    import torch.nn.functional as F

    pred = logits.argmax(1)
    logp, logq = F.log_softmax(fp, 1), F.log_softmax(logits, 1)
    return {
        "top1": (pred[center] == y[center]).float().mean().item(),
        "top1_views": (pred == y).float().mean().item(),
        "agree": (pred == fp.argmax(1)).float().mean().item(),
        "kl": (logp.exp() * (logp - logq)).sum(1).clamp_min(0).mean().item(),
    }


@torch.no_grad()
def _logits(model: torch.nn.Module, x: torch.Tensor, bs: int = 50) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + bs]).float() for i in range(0, x.shape[0], bs)])


def run_demo(out: str = DEFAULT_OUT, *, overwrite: bool = False, quick: bool = False,
             avg_bits: Optional[float] = None, seed: int = 0, brecq: bool = True,
             log: Optional[Callable[[str], None]] = None, progress: bool = True) -> Dict[str, Any]:
    """Run the demo and write its report folder ``out``; returns the report dict (also in ``report.json``).

    Raises FileExistsError when ``out`` already holds a report and ``overwrite`` is False, and
    :class:`mixquant.zoo.MissingDataError` when the offline models/photos are not installed
    (``bash scripts/install_data.sh``).
    """
    import mixquant
    from mixquant import zoo

    from .plots import allocation_plot, comparison_plot, heatmap_plot, require_matplotlib
    from .runner import machine_info

    settings = DemoSettings.quick() if quick else DemoSettings()
    if avg_bits is not None:
        if isinstance(avg_bits, bool) or not isinstance(avg_bits, (int, float)) or not 2 <= avg_bits <= 8:
            raise ValueError(f"avg_bits must be a number in [2, 8], got {avg_bits!r}")
        settings.avg_bits = float(avg_bits)
    log = log or (lambda msg: print(msg, flush=True))
    _check_out(out, overwrite)
    require_matplotlib()  # fail before the work, not after
    t_start = time.perf_counter()
    timings: Dict[str, float] = {}

    def step(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 2)

    # 1. model and data ------------------------------------------------------
    t0 = time.perf_counter()
    log("[1/5] loading MobileNetV2 (ImageNet weights) and the offline photos")
    model = zoo.mobilenet_v2().eval()
    photos = zoo.imagenet_photos()
    if settings.photos is not None:
        photos = photos[: settings.photos]
    x = torch.cat([zoo.imagenet_crops(img, n=settings.views, resize=settings.resize, size=settings.size)
                   for img, _, _ in photos])
    y = torch.tensor([label for _, label, _ in photos]).repeat_interleave(settings.views)
    center = torch.arange(len(photos)) * settings.views
    calib = calibration_crops(settings.calib, settings.size, seed)
    fp_logits = _logits(model, x)
    fp = _metrics(fp_logits, fp_logits, y, center)
    log(f"      {len(photos)} labelled photos x {settings.views} views = {x.shape[0]} evaluation images, "
        f"{calib.shape[0]} calibration crops from {len(zoo.unlabelled_photos())} other photos; "
        f"FP32 top-1 {fp['top1'] * len(photos):.0f}/{len(photos)}")
    step("load", t0)

    # 2. search ---------------------------------------------------------------
    t0 = time.perf_counter()
    log(f"[2/5] MixQuant search: per-layer bits 2..8 at an average of {settings.avg_bits:g} bits (budget rule)")
    config = mixquant.search(model, range(2, 9), avg_bits=settings.avg_bits)
    lo = math.floor(settings.avg_bits)
    uniform_bits = [lo] if settings.avg_bits == lo else [lo, lo + 1]
    uniforms = {b: mixquant.uniform(model, b) for b in uniform_bits}
    used = sorted(set(config.bits.values()))
    fp_kib = sum(math.prod(shape) for shape in config.shapes.values()) * 4 / 1024
    log(f"      {len(config.bits)} layers, average {config.avg_bits:.3f} bits, bit-widths used {used}, "
        f"{config.size_bytes / 1024:.0f} KiB packed (FP32 weights: {fp_kib:.0f} KiB)")
    step("search", t0)

    # 3. quantize -------------------------------------------------------------
    runs: List[Dict[str, Any]] = []
    jobs = [("asymmetric", f"uniform {b}", cfg) for b, cfg in uniforms.items()]
    jobs.append(("asymmetric", "MixQuant", config))
    if brecq:
        jobs += [("brecq", f"uniform {uniform_bits[0]}", uniforms[uniform_bits[0]]), ("brecq", "MixQuant", config)]
    log(f"[3/5] quantizing: {len(jobs)} models (vanilla asymmetric"
        + (f"; BRECQ with {settings.brecq['iters']} iterations per block on {settings.brecq['num_samples']} crops)"
           if brecq else ")"))
    t0 = time.perf_counter()
    qmodels = []
    for method, label, cfg in jobs:
        t1 = time.perf_counter()
        kwargs: Dict[str, Any] = {"progress": progress and method == "brecq", "seed": seed}
        if method == "brecq":
            kwargs.update({k: v for k, v in settings.brecq.items() if v is not None})
            kwargs["calib_data"] = calib
        qmodel = mixquant.quantize(model, cfg, method, **kwargs)
        secs = time.perf_counter() - t1
        log(f"      {method:10s} {label:11s} avg {cfg.avg_bits:.3f} bits ... {secs:.1f} s")
        qmodels.append((method, label, cfg, qmodel, secs))
    step("quantize", t0)

    # 4. evaluate -------------------------------------------------------------
    t0 = time.perf_counter()
    log("[4/5] evaluating against the labels and against the FP32 model")
    for method, label, cfg, qmodel, secs in qmodels:
        m = _metrics(_logits(qmodel, x), fp_logits, y, center)
        runs.append({"method": method, "config": label, "avg_bits": cfg.avg_bits, "size_bytes": cfg.size_bytes,
                     "metrics": m, "quantize_seconds": round(secs, 2)})
    step("evaluate", t0)
    table = _table(runs, fp, len(photos), x.shape[0])
    print(table)

    # 5. report -----------------------------------------------------------------
    t0 = time.perf_counter()
    log(f"[5/5] writing the report to {out}/")
    os.makedirs(out, exist_ok=True)
    config.save(os.path.join(out, "bits.json"), overwrite=True)
    report = {
        "model": "mobilenet_v2", "avg_bits": settings.avg_bits, "seed": seed, "quick": quick,
        "settings": {"photos": len(photos), "views": settings.views, "eval_images": int(x.shape[0]),
                     "calib_images": int(calib.shape[0]), "image_size": settings.size, "brecq": settings.brecq},
        "data": {"evaluation": "foolbox's labelled ImageNet photos, grid views (5 crops + mirrors)",
                 "calibration": "random-resized crops of scikit-image's natural photos (disjoint from evaluation)"},
        "fp32": fp, "runs": runs, "bits": dict(config.bits), "timings_s": timings, "machine": machine_info(),
    }
    info = {
        "title": "MobileNetV2", "levels": [settings.avg_bits],
        "layers": [{"name": n, "params": int(math.prod(s))} for n, s in config.shapes.items()],
        "errors_per_channel": config.errors,
    }
    recs = [{"model": "mobilenet_v2", "study": "asym", "selector": "mixquant", "level": settings.avg_bits,
             "avg_bits": config.avg_bits, "bits": dict(config.bits)}]
    allocation_plot("mobilenet_v2", info, recs, os.path.join(out, "bits.png"), pinned_note="every layer free")
    heatmap_plot("mobilenet_v2", info, recs, os.path.join(out, "errors.png"))
    comparison_plot(runs, fp, os.path.join(out, "comparison.png"),
                    title=f"MobileNetV2, average {settings.avg_bits:g} weight bits, {x.shape[0]} views of "
                          f"{len(photos)} photos")
    timings["report"] = round(time.perf_counter() - t0, 2)
    timings["total"] = round(time.perf_counter() - t_start, 2)
    report["timings_s"] = timings
    with open(os.path.join(out, "report.json"), "w") as fh:
        json.dump(report, fh, indent=1)
        fh.write("\n")
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write(_markdown(report, table))
    log(f"done in {timings['total']:.0f} s; report: {os.path.abspath(os.path.join(out, 'report.md'))}")
    return report


def _table(runs: List[Dict[str, Any]], fp: Dict[str, float], photos: int, views: int) -> str:
    rows = [("method", "config", "avg bits", "KiB", f"top-1 /{photos}", f"top-1 ({views} views)", "agreement", "KL")]
    rows.append(("FP32", "-", "32", "-", f"{fp['top1'] * photos:.0f}", f"{100 * fp['top1_views']:.1f} %", "100.0 %",
                 "0"))
    for r in runs:
        m = r["metrics"]
        rows.append((r["method"], r["config"], f"{r['avg_bits']:.3f}", f"{r['size_bytes'] / 1024:.0f}",
                     f"{m['top1'] * photos:.0f}", f"{100 * m['top1_views']:.1f} %", f"{100 * m['agree']:.1f} %",
                     f"{m['kl']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _markdown(report: Dict[str, Any], table: str) -> str:
    s = report["settings"]
    b = s["brecq"]
    lines = [
        "# mixquant demo report",
        "",
        f"MobileNetV2 (torchvision's ImageNet weights), MixQuant at an average of {report['avg_bits']:g} weight "
        "bits against the uniform bit-width(s) of the same average, quantized with vanilla asymmetric "
        "round-to-nearest and with BRECQ. Every layer is free (none is pinned), so the averages compare directly.",
        "",
        f"- Evaluation: {s['eval_images']} images = {s['photos']} labelled photos x {s['views']} views "
        f"({report['data']['evaluation']}), {s['image_size']} px.",
        f"- Calibration: {s['calib_images']} {report['data']['calibration']}.",
        f"- BRECQ preset: {b['iters']} iterations per block, batch {b['batch_size']}, {b['num_samples']} "
        "calibration crops (the paper uses 20,000 iterations on 1,024 images).",
        f"- Time: {report['timings_s']['total']:.0f} s ({', '.join(f'{k} {v:.1f} s' for k, v in report['timings_s'].items() if k != 'total')}).",
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
        "![MixQuant's per-layer bits](bits.png)",
        "",
        "![roundoff error per layer and bit-width](errors.png)",
        "",
        "`bits.json` holds MixQuant's bit config (`mixquant.BitConfig.load('bits.json')`).",
        "",
    ]
    return "\n".join(lines)
