"""What each BRECQ preset costs on this machine: seconds per iteration, per unit and per model.

For ResNet-20 (Fashion-MNIST, 28x28 inputs) and MobileNetV2 (ImageNet, 224x224
crops of the offline photos), BRECQ runs a few iterations per unit at each
preset's batch size; the median seconds per iteration of every unit (from the
BRECQ report) times the preset's iterations gives the reconstruction time of
the whole model. Caching each unit's inputs and targets (forward passes over
``num_samples``) and the activation phase are not included, so the totals are
lower bounds.

One command, prints a table (the figures behind ``mixquant quantize --help``)::

    python benchmarks/bench_presets.py [--iters 4] [--threads 1] [--models resnet20,mobilenet_v2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import mixquant
from mixquant import zoo
from mixquant.presets import BRECQ_PRESETS


def _data(name: str, n: int) -> torch.Tensor:
    if name == "resnet20":
        x, _ = zoo.fashion_mnist("train")
        return zoo.fashion_mnist_normalize(x[:n])
    from mixquant.experiments.demo import calibration_crops

    return calibration_crops(n, 224, seed=0)


def measure(name: str, preset: str, iters: int) -> dict:
    model = {"resnet20": zoo.resnet20, "mobilenet_v2": zoo.mobilenet_v2}[name]().eval()
    p = BRECQ_PRESETS[preset]
    x = _data(name, 2 * p["batch_size"])
    cfg = mixquant.uniform(model, 4, errors=False)
    t0 = time.perf_counter()
    q = mixquant.quantize(model, cfg, "brecq", calib_data=x, iters=iters, batch_size=p["batch_size"],
                          num_samples=x.shape[0], progress=False)
    wall = time.perf_counter() - t0
    units = [r for r in q.mixquant_report.records if r.iters]
    per_iter = [r.median_iter_s for r in units]
    return {"model": name, "preset": preset, "batch": p["batch_size"], "units": len(units),
            "median_s_iter": statistics.median(per_iter), "max_s_iter": max(per_iter),
            "model_s_iter": sum(per_iter), "estimate_s": sum(per_iter) * p["iters"], "run_s": wall}


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else (f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=4, help="iterations measured per unit (default 4)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--models", default="resnet20,mobilenet_v2", help="comma-separated (default both)")
    ap.add_argument("--presets", default=",".join(BRECQ_PRESETS), help="comma-separated (default all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = "/".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, load average {load}")
    rows = [("model", "preset", "batch", "units", "median s/iter", "max s/iter", "s per model iter",
             "iters", "estimated total")]
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
            r = measure(name, preset, args.iters)
            rows.append((name, preset, str(r["batch"]), str(r["units"]), f"{r['median_s_iter']:.3f}",
                         f"{r['max_s_iter']:.3f}", f"{r['model_s_iter']:.2f}", str(BRECQ_PRESETS[preset]["iters"]),
                         _duration(r["estimate_s"])))
            print(f"  {name}/{preset}: {r['model_s_iter']:.2f} s per iteration of every unit", flush=True)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    print("\n".join(lines))
    print(f"load average at end {'/'.join(f'{v:.2f}' for v in os.getloadavg())}; totals exclude caching and "
          "the activation phase")
    return 0


if __name__ == "__main__":
    sys.exit(main())
