"""``mixquant demo``: the whole pipeline on MobileNetV2 and real photos, in a few minutes on a laptop CPU.

Steps: load MobileNetV2 (torchvision's ImageNet weights) and the offline photos →
MixQuant search at an average weight bit-width → quantize with vanilla
asymmetric round-to-nearest and with BRECQ (a CPU-sized preset), next to the
uniform bit-width(s) of the same average → evaluate against the labels and
against the FP32 model → print a table → write a report folder:

* ``report.md``: the table (sizes, compression, accuracy, fidelity), the settings, where
  the data came from, MixQuant's bits per layer, BRECQ's unit tables, the machine;
* ``report.json``: every number and setting;
* ``bits.json``: MixQuant's bit config (``mixquant.BitConfig.load``);
* ``comparison.png``, ``curve.png`` (accuracy against average bits), ``bits.png``, ``errors.png``: plots.

Calibration uses crops of scikit-image's natural photos; evaluation uses
foolbox's 20 labelled ImageNet photos (10 views each: five crops and their mirror images),
so the two never overlap.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..io.files import check_destination, write_text_atomic
from .names import DEMO_OUT

__all__ = ["DemoSettings", "run_demo", "REPORT_FILES", "DEFAULT_OUT"]

DEFAULT_OUT = DEMO_OUT
REPORT_FILES = ("report.md", "report.json", "bits.json", "comparison.png", "curve.png", "bits.png", "errors.png")


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
    # The accuracy-against-bits curve (vanilla asymmetric): uniform bit-widths and MixQuant averages.
    curve_uniform: Tuple[int, ...] = (3, 4, 5, 6, 8)
    curve_mixquant: Tuple[float, ...] = (3.0, 3.5, 4.0, 4.5, 5.0, 6.0)
    curve_views: int = 2  # views per photo the curve is measured on (the first ones: centre, top-left)

    @classmethod
    def quick(cls, avg_bits: float = 4.0) -> "DemoSettings":
        return cls(avg_bits=avg_bits, photos=3, views=2, calib=8, resize=128, size=112,
                   brecq={"iters": 2, "batch_size": 4, "num_samples": 8, "num_threads": 1},
                   curve_uniform=(4, 8), curve_mixquant=(3.0, 6.0), curve_views=1)


def calibration_crops(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` random-resized ``size`` px crops of scikit-image's photos, interleaved so any prefix covers every photo."""
    from mixquant import zoo

    photos = zoo.unlabelled_photos()
    per = -(-n // len(photos))
    views = [zoo.imagenet_crops(img, n=per, mode="random", seed=1000 * seed + i, size=size)
             for i, (img, _) in enumerate(photos)]
    return torch.stack(views, 1).reshape(-1, *views[0].shape[1:])[:n].contiguous()


def _check_out(out: str, overwrite: bool) -> None:
    """Every file of the report can be written (checked before the work)."""
    if os.path.lexists(out):
        if not os.path.isdir(out):
            raise FileExistsError(f"{out!r} exists and is not a folder")
        existing = [f for f in REPORT_FILES if os.path.lexists(os.path.join(out, f))]
        if existing and not overwrite:
            raise FileExistsError(f"{out!r} already holds a report ({', '.join(existing)}); pass --overwrite "
                                  "to replace it, or choose another --out")
        for f in REPORT_FILES:
            check_destination(os.path.join(out, f), overwrite)
    else:
        check_destination(out)  # its parent folder exists and is writable


def _metrics(logits: torch.Tensor, fp: torch.Tensor, y: torch.Tensor, center: torch.Tensor) -> Dict[str, float]:
    import torch.nn.functional as F

    pred = logits.argmax(1)
    logp, logq = F.log_softmax(fp, 1), F.log_softmax(logits, 1)
    return {  # shares in double: 0.9, not 0.8999999761581421
        "top1": (pred[center] == y[center]).double().mean().item(),
        "top1_views": (pred == y).double().mean().item(),
        "agree": (pred == fp.argmax(1)).double().mean().item(),
        "kl": (logp.exp() * (logp - logq)).sum(1).clamp_min(0).double().mean().item(),
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

    from . import demo_report
    from .plots import allocation_plot, bits_curve_plot, comparison_plot, heatmap_plot, require_matplotlib
    from .runner import machine_info

    settings = DemoSettings.quick() if quick else DemoSettings()
    if avg_bits is not None:
        if isinstance(avg_bits, bool) or not isinstance(avg_bits, (int, float)) or not 2 <= avg_bits <= 8:
            raise ValueError(f"avg_bits must be a number in [2, 8], got {avg_bits!r}")
        settings.avg_bits = float(avg_bits)
    log = log or (lambda msg: print(msg, flush=True))
    _check_out(out, overwrite)
    require_matplotlib()  # fail before the work, not after
    load_start = _load_average()
    t_start = time.perf_counter()
    timings: Dict[str, float] = {}
    steps = 6

    def step(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 2)

    # 1. model and data ------------------------------------------------------
    t0 = time.perf_counter()
    log(f"[1/{steps}] loading MobileNetV2 (ImageNet weights) and the offline photos")
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
    log(f"[2/{steps}] MixQuant search: per-layer bits 2..8 at an average of {settings.avg_bits:g} bits (budget rule)")
    config = mixquant.search(model, range(2, 9), avg_bits=settings.avg_bits)
    lo = math.floor(settings.avg_bits)
    uniform_bits = [lo] if settings.avg_bits == lo else [lo, lo + 1]
    uniforms = {b: mixquant.uniform(model, b) for b in uniform_bits}
    used = sorted(set(config.bits.values()))
    fp32_bytes = sum(math.prod(shape) for shape in config.shapes.values()) * 4
    log(f"      {len(config.bits)} layers, average {config.avg_bits:.3f} bits, bit-widths used {used}, "
        f"{config.size_bytes / 1024:.0f} KiB packed (FP32 weights: {fp32_bytes / 1024:.0f} KiB, "
        f"{fp32_bytes / config.size_bytes:.1f}x larger)")
    step("search", t0)

    # 3. quantize -------------------------------------------------------------
    jobs = [("asymmetric", f"uniform {b}", cfg) for b, cfg in uniforms.items()]
    jobs.append(("asymmetric", "MixQuant", config))
    if brecq:
        jobs += [("brecq", f"uniform {uniform_bits[0]}", uniforms[uniform_bits[0]]), ("brecq", "MixQuant", config)]
    b = settings.brecq
    log(f"[3/{steps}] quantizing {len(jobs)} models: vanilla asymmetric"
        + (f", then BRECQ ({b['iters']} iterations per unit, batch {b['batch_size']}, {b['num_samples']} crops, "
           f"{b.get('num_threads') or 'default'} thread(s))" if brecq else ""))
    t0 = time.perf_counter()
    qmodels = []
    asym_models: Dict[Tuple[str, float], torch.nn.Module] = {}  # reused by the curve
    brecq_seconds: List[float] = []
    for i, (method, label, cfg) in enumerate(jobs, 1):
        eta = (f"; about {brecq_seconds[-1]:.0f} s, like the previous BRECQ run" if method == "brecq" and brecq_seconds
               else "; a progress bar per unit shows its time left" if method == "brecq" and progress else "")
        log(f"      ({i}/{len(jobs)}) {method} {label}, average {cfg.avg_bits:.3f} bits{eta}")
        t1 = time.perf_counter()
        kwargs: Dict[str, Any] = {"progress": progress and method == "brecq", "seed": seed}
        if method == "brecq":
            kwargs.update({k: v for k, v in settings.brecq.items() if v is not None})
            kwargs["calib_data"] = calib
        qmodel = mixquant.quantize(model, cfg, method, **kwargs)
        secs = time.perf_counter() - t1
        if method == "brecq":
            brecq_seconds.append(secs)
        log(f"            done in {secs:.1f} s")
        qmodels.append((method, label, cfg, qmodel, secs))
        if method == "asymmetric":
            asym_models[("MixQuant", settings.avg_bits) if label == "MixQuant" else ("uniform", float(cfg.avg_bits))] = qmodel
    step("quantize", t0)

    # 4. evaluate -------------------------------------------------------------
    t0 = time.perf_counter()
    log(f"[4/{steps}] evaluating {len(qmodels)} models on {x.shape[0]} images, against the labels and the FP32 model")
    runs: List[Dict[str, Any]] = []
    brecq_tables: Dict[str, str] = {}
    brecq_units: Dict[str, Any] = {}
    for method, label, cfg, qmodel, secs in qmodels:
        m = _metrics(_logits(qmodel, x), fp_logits, y, center)
        runs.append({"method": method, "config": label, "avg_bits": cfg.avg_bits, "size_bytes": cfg.size_bytes,
                     "compression": fp32_bytes / cfg.size_bytes, "metrics": m, "quantize_seconds": round(secs, 2)})
        if method == "brecq":
            brecq_tables[f"BRECQ, {label}"] = qmodel.mixquant_report.table()
            brecq_units[label] = qmodel.mixquant_report.to_dict()
    step("evaluate", t0)
    table = demo_report.results_table(runs, fp, len(photos), x.shape[0], fp32_bytes)
    print(table)

    # 5. accuracy against average bits ----------------------------------------
    t0 = time.perf_counter()
    views = min(settings.curve_views, settings.views)
    sub = (torch.arange(len(photos))[:, None] * settings.views + torch.arange(views)[None, :]).reshape(-1)
    xs, fp_sub = x[sub], fp_logits[sub]
    points = [("uniform", float(v)) for v in settings.curve_uniform] + [("MixQuant", v) for v in settings.curve_mixquant]
    log(f"[5/{steps}] accuracy against average bits on {xs.shape[0]} images ({views} views per photo): "
        f"{sum(p not in asym_models for p in points)} more vanilla asymmetric models "
        f"(uniform {', '.join(str(v) for v in settings.curve_uniform)}; MixQuant at "
        f"{', '.join(f'{v:g}' for v in settings.curve_mixquant)} bits)")
    curve = []
    for selector, level in points:
        q = asym_models.get((selector, level))
        if q is None:
            cfg = (mixquant.uniform(model, int(level), errors=False) if selector == "uniform"
                   else mixquant.search(model, range(2, 9), avg_bits=level))
            q = mixquant.quantize(model, cfg, "asymmetric", progress=False)
        info_q = mixquant.quant_info(q)
        curve.append({"selector": selector, "level": level, "avg_bits": info_q.avg_bits, "size_bytes": info_q.size_bytes,
                      "metrics": _metrics(_logits(q, xs), fp_sub, y[sub], torch.arange(len(photos)) * views)})
    step("curve", t0)

    # 6. report -----------------------------------------------------------------
    t0 = time.perf_counter()
    log(f"[6/{steps}] writing the report to {out}/")
    os.makedirs(out, exist_ok=True)
    config.save(os.path.join(out, "bits.json"), overwrite=overwrite)
    uniform_cfg = uniforms[uniform_bits[0]]
    layers = [{"name": n, "params": int(math.prod(s)), "bits": config.bits[n],
               "norm": config.error(n, "norm", config.bits[n]),
               "norm_uniform": uniform_cfg.error(n, "norm", uniform_bits[0])} for n, s in config.shapes.items()]
    report = {
        "model": "mobilenet_v2", "avg_bits": settings.avg_bits, "seed": seed, "quick": quick,
        "settings": {"photos": len(photos), "views": settings.views, "eval_images": int(x.shape[0]),
                     "calib_images": int(calib.shape[0]), "image_size": settings.size, "brecq": settings.brecq},
        "data": {"evaluation": "foolbox's labelled ImageNet photos, grid views (5 crops + mirrors)",
                 "calibration": "random-resized crops of scikit-image's natural photos (disjoint from evaluation)"},
        "fp32": {**fp, "size_bytes": fp32_bytes}, "runs": runs, "curve": curve, "curve_images": int(xs.shape[0]),
        "layers": layers,
        "bits": dict(config.bits), "brecq_units": brecq_units, "timings_s": timings, "machine": machine_info(),
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
    bits_curve_plot(curve, fp, os.path.join(out, "curve.png"),
                    title=f"MobileNetV2, vanilla asymmetric (per channel), {xs.shape[0]} views of {len(photos)} photos")
    timings["report"] = round(time.perf_counter() - t0, 2)
    timings["total"] = round(time.perf_counter() - t_start, 2)
    report["timings_s"] = timings
    report["load_average"] = {"start": load_start, "end": _load_average()}
    report["layer_table"] = demo_report.layer_table(layers, uniform_bits[0])
    report["brecq_tables"] = brecq_tables
    write_text_atomic(os.path.join(out, "report.json"),
                      demo_report.dumps({k: v for k, v in report.items() if k not in ("layer_table", "brecq_tables")}),
                      overwrite)
    write_text_atomic(os.path.join(out, "report.md"), demo_report.markdown(report, table), overwrite)
    log(f"done in {timings['total']:.0f} s; report: {os.path.abspath(os.path.join(out, 'report.md'))}")
    return report


def _load_average() -> str:
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - not available on this platform
        return "n/a"
