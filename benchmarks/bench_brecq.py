"""Benchmark of BRECQ's reconstruction iteration on the CPU, unit by unit, with a whole-model estimate.

For every reconstruction unit of the zoo's ResNet-20 (Fashion-MNIST shapes,
1x28x28 input), the MNIST digit CNN (1x28x28) and MobileNetV2 (3x224x224),
one AdaRound iteration (a batch of cached samples, forward, loss, backward,
rounding update) is timed three ways, alternately iteration by iteration in
the same run, on folded weights and random inputs (a fourth column, the
*floor*, is the unit's forward and backward pass alone: what no rounding
implementation can go below):

* ``mixquant``: :func:`mixquant.methods.brecq.make_step`, the fused native
  rounding step behind ``quantize(..., "brecq")``, on its channels-last cache;
* ``autograd``: the same iteration as mixquant ran it before the fused step
  (AdaRound modules differentiated by autograd, the regulariser as a loss
  term, ``torch.optim.Adam``, the cache in the NCHW layout);
* ``reference-style``: the loop of BRECQ's public code (the soft weight
  recomputed from the float weight each iteration, ``floor(w / s)``
  included, the regulariser as a loss term, ``torch.optim.Adam``).

The regulariser is on in every timed iteration (no warm-up). Reported: the
median seconds per iteration of each unit, ratios, the median per unit kind
(BasicBlock, inverted residual, single layer) and, per model, the sum over
its units times ``--estimate-iters`` (the whole reconstruction at that
length, caching and evaluation excluded). Each thread count in ``--threads``
is a separate pass. The load average is printed beside the figures: on a
shared machine the ratios (measured in the same run) are more telling than
the absolute times.

Usage::

    python benchmarks/bench_brecq.py [--models resnet20,mnist_digit,mobilenet_v2] [--threads 1,2]
                                     [--iters 20] [--samples 64] [--batch 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn

import mixquant
from mixquant import zoo
from mixquant.methods import adaround
from mixquant.methods.adaround import GAMMA, ZETA, AdaRound
from mixquant.methods.blocks import build_units
from mixquant.methods.brecq import BrecqOptions, make_step
from mixquant.methods.cache import UnitData, capture_inputs, capture_targets, probe_unit, rec_loss
from mixquant.methods.common import execution_order
from mixquant.nn.fold import fold_bn

MODELS: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...]]] = {
    "resnet20": (zoo.resnet20, (1, 28, 28)),
    "mnist_digit": (zoo.mnist_cnn_digit, (1, 28, 28)),
    "mobilenet_v2": (zoo.mobilenet_v2, (3, 224, 224)),
}
LAMBDA, BETA, LR = 0.01, 10.0, 1e-3


def _qparams(layer: nn.Module, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return mixquant.choose_qparams(layer.weight.detach(), bits, per_channel=True, clip="mse", p=2.4,
                                   ch_axis=mixquant.channel_axis(layer))


def _roundings(unit: nn.Module, names: List[str], prefix: str, bits: int) -> Dict[str, AdaRound]:
    out = {}
    for name in names:
        layer = unit.get_submodule(name[len(prefix) + 1:]) if name != prefix else unit
        s, z = _qparams(layer, bits)
        r = AdaRound(layer.weight.detach(), s, z, bits, mixquant.channel_axis(layer))
        adaround.attach(layer, r)
        out[name] = r
    return out


def ours(unit: nn.Module, names: List[str], prefix: str, data: UnitData, bits: int, batch: int) -> Callable[[], None]:
    """mixquant's iteration (make_step, native fused rounding step)."""
    rs = _roundings(unit, names, prefix, bits)
    opts = BrecqOptions(iters=10**6, batch_size=batch, warmup=0.0, lr=LR, rounding_weight=LAMBDA,
                        beta_range=(BETA, BETA))
    step, _ = make_step(unit, data, list(rs.values()), opts, torch.Generator().manual_seed(0))
    counter = iter(range(10**9))
    return lambda: step(next(counter))


def autograd_step(unit: nn.Module, names: List[str], prefix: str, data: UnitData, bits: int,
                  batch: int) -> Callable[[], None]:
    """The previous iteration: AdaRound modules under autograd, regulariser in the loss, torch.optim.Adam."""
    rs = list(_roundings(unit, names, prefix, bits).values())
    opt = torch.optim.Adam([r.V for r in rs], lr=LR)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        idx = torch.randperm(len(data), generator=gen)[:batch]
        x, y, w = data.batch(idx)
        loss = rec_loss(unit(x), y, w, data.channel_dim) + LAMBDA * sum(r.regularizer(BETA) for r in rs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def reference_style(unit: nn.Module, names: List[str], prefix: str, data: UnitData, bits: int,
                    batch: int) -> Callable[[], None]:
    """BRECQ's public loop: the soft weight rebuilt from the float weight every iteration."""
    alphas = []
    qmax = float(2**bits - 1)
    for name in names:
        layer = unit.get_submodule(name[len(prefix) + 1:]) if name != prefix else unit
        s, z = _qparams(layer, bits)
        w = layer._parameters.pop("weight").detach()
        shape = [1] * w.dim()
        shape[mixquant.channel_axis(layer)] = -1
        s, z = s.reshape(shape), z.float().reshape(shape)
        frac = w / s - torch.floor(w / s)
        alpha = torch.log((frac - GAMMA) / (ZETA - frac)).requires_grad_(True)
        alphas.append(alpha)

        def hook(m: nn.Module, _a: tuple, w=w, s=s, z=z, alpha=alpha) -> None:
            h = torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)
            m.__dict__["weight"] = (torch.clamp(torch.floor(w / s) + h + z, 0, qmax) - z) * s

        layer.register_forward_pre_hook(hook)
    opt = torch.optim.Adam(alphas, lr=LR)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        idx = torch.randperm(len(data), generator=gen)[:batch]
        x, y, w = data.batch(idx)
        reg = 0.0
        for a in alphas:
            h = torch.clamp(torch.sigmoid(a) * (ZETA - GAMMA) + GAMMA, 0, 1)
            reg = reg + (1 - ((h - 0.5).abs() * 2).pow(BETA)).sum()
        loss = rec_loss(unit(x), y, w, data.channel_dim) + LAMBDA * reg
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def floor_step(unit: nn.Module, names: List[str], prefix: str, data: UnitData, bits: int,
               batch: int) -> Callable[[], None]:
    """No rounding at all: the batch, the unit's forward and backward for plain float weights (the floor)."""
    ws = []
    for name in names:
        layer = unit.get_submodule(name[len(prefix) + 1:]) if name != prefix else unit
        layer.weight.requires_grad_(True)
        ws.append(layer.weight)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        idx = torch.randperm(len(data), generator=gen)[:batch]
        x, y, w = data.batch(idx)
        for p in ws:
            p.grad = None
        rec_loss(unit(x), y, w, data.channel_dim).backward()

    return step


IMPLS = {"mixquant": ours, "autograd": autograd_step, "reference-style": reference_style, "floor": floor_step}


def unit_data(folded: nn.Module, unit_name: str, x: torch.Tensor, batch: int) -> UnitData:
    mod = folded.get_submodule(unit_name) if unit_name else folded
    shape = probe_unit(folded, mod, x, batch, torch.device("cpu"))
    inp = capture_inputs(folded, mod, x, batch, torch.device("cpu"), shape)
    out, _ = capture_targets(folded, mod, x, batch, torch.device("cpu"), shape)
    return UnitData(inp, out, None, -1 if isinstance(mod, nn.Linear) else 1)


def time_unit(folded: nn.Module, unit, data: UnitData, bits: int, batch: int, iters: int) -> Dict[str, float]:
    # mixquant gets its own cache (channels-last for 4-D); the other loops the plain NCHW layout they used
    plain = UnitData(data.x.contiguous(), data.y.contiguous(), None, data.channel_dim)
    steps = {}
    for name, make in IMPLS.items():
        mod = copy.deepcopy(unit.module)
        mod.requires_grad_(False)
        steps[name] = make(mod, unit.layers, unit.name, data if name in ("mixquant", "floor") else plain, bits, batch)
    for _ in range(3):  # warm-up (first calls allocate and pick kernels)
        for f in steps.values():
            f()
    times: Dict[str, List[float]] = {k: [] for k in steps}
    for _ in range(iters):
        for k, f in steps.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def kind_of(model_name: str, unit) -> str:
    if unit.kind == "layer":
        return "single layer"
    return "BasicBlock" if model_name == "resnet20" else "inverted residual"


def run_model(name: str, args: argparse.Namespace) -> List[dict]:
    build, in_shape = MODELS[name]
    model = build().eval()
    folded = fold_bn(model).eval()
    folded.requires_grad_(False)
    x = torch.randn(args.samples, *in_shape, generator=torch.Generator().manual_seed(0))
    layers = mixquant.find_layers(folded)
    order = execution_order(folded, list(layers), x[:1])
    rows = []
    for unit in build_units(folded, {n: args.bits for n in layers}, order):
        data = unit_data(folded, unit.name, x, args.batch)
        t = time_unit(folded, unit, data, args.bits, args.batch, args.iters)
        weights = sum(folded.get_submodule(n).weight.numel() for n in unit.layers)
        rows.append({"model": name, "unit": unit.name, "kind": kind_of(name, unit), "layers": len(unit.layers),
                     "weights": weights, "in_shape": list(data.x.shape[1:]), **{f"{k}_s": v for k, v in t.items()}})
        print(f"  {name:12s} {unit.name or '<model>':22s} {rows[-1]['kind']:17s} "
              + "  ".join(f"{k} {v * 1e3:8.2f} ms" for k, v in t.items()), file=sys.stderr, flush=True)
    return rows


def table(rows: List[dict], header: List[str], cells: Callable[[dict], List[str]]) -> str:
    body = [header] + [cells(r) for r in rows]
    widths = [max(len(row[i]) for row in body) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in body]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def ms(v: float) -> str:
    return f"{v * 1e3:.2f}"


def report(rows: List[dict], threads: int, estimate_iters: int) -> str:
    out = [f"### {threads} thread(s)", ""]
    out.append(table(rows, ["model", "unit", "kind", "weights", "mixquant ms", "autograd ms", "reference-style ms",
                            "floor ms", "vs autograd", "vs reference-style", "mixquant / floor"],
                     lambda r: [r["model"], r["unit"] or "<model>", r["kind"], str(r["weights"]), ms(r["mixquant_s"]),
                                ms(r["autograd_s"]), ms(r["reference-style_s"]), ms(r["floor_s"]),
                                f"{r['autograd_s'] / r['mixquant_s']:.2f}x",
                                f"{r['reference-style_s'] / r['mixquant_s']:.2f}x",
                                f"{r['mixquant_s'] / r['floor_s']:.2f}"]))
    kinds = []
    for key in sorted({(r["model"], r["kind"]) for r in rows}):
        sel = [r for r in rows if (r["model"], r["kind"]) == key]
        med = {k: statistics.median(r[f"{k}_s"] for r in sel) for k in IMPLS}
        kinds.append({"model": key[0], "kind": key[1], "units": len(sel), **med})
    out += ["", "Median over units of each kind:", ""]
    out.append(table(kinds, ["model", "kind", "units", "mixquant ms", "autograd ms", "reference-style ms",
                             "floor ms", "vs autograd", "vs reference-style"],
                     lambda k: [k["model"], k["kind"], str(k["units"]), ms(k["mixquant"]), ms(k["autograd"]),
                                ms(k["reference-style"]), ms(k["floor"]), f"{k['autograd'] / k['mixquant']:.2f}x",
                                f"{k['reference-style'] / k['mixquant']:.2f}x"]))
    models = []
    for m in dict.fromkeys(r["model"] for r in rows):
        sel = [r for r in rows if r["model"] == m]
        models.append({"model": m, "units": len(sel), **{k: sum(r[f"{k}_s"] for r in sel) * estimate_iters
                                                          for k in IMPLS}})
    out += ["", f"Whole model, {estimate_iters} iterations per unit (sum of the units' medians; caching and "
            "evaluation excluded):", ""]
    out.append(table(models, ["model", "units", "mixquant", "autograd", "reference-style", "floor", "vs autograd",
                              "vs reference-style"],
                     lambda k: [k["model"], str(k["units"]), f"{k['mixquant'] / 60:.1f} min",
                                f"{k['autograd'] / 60:.1f} min", f"{k['reference-style'] / 60:.1f} min",
                                f"{k['floor'] / 60:.1f} min",
                                f"{k['autograd'] / k['mixquant']:.2f}x",
                                f"{k['reference-style'] / k['mixquant']:.2f}x"]))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet20,mnist_digit,mobilenet_v2",
                    help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)")
    ap.add_argument("--iters", type=int, default=20, help="timed iterations per unit and implementation")
    ap.add_argument("--samples", type=int, default=64, help="cached samples per unit (default 64)")
    ap.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    ap.add_argument("--bits", type=int, default=2, help="weight bits (default 2)")
    ap.add_argument("--estimate-iters", type=int, default=2000, help="iterations per unit of the estimate")
    ap.add_argument("--json", help="write every measurement to this file")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    threads = [int(t) for t in args.threads.split(",")]
    load0 = os.getloadavg()
    results, texts = [], []
    for nt in threads:
        torch.set_num_threads(nt)
        rows = [r for m in models for r in run_model(m, args)]
        for r in rows:
            r["threads"] = nt
        results += rows
        texts.append(report(rows, nt, args.estimate_iters))
    load1 = os.getloadavg()
    print("\n\n".join(texts))
    print(f"\n{args.samples} cached samples, batch {args.batch}, W{args.bits}, lambda {LAMBDA}, beta {BETA}, "
          f"{args.iters} timed iterations per unit and implementation (medians); torch {torch.__version__}, "
          f"SIMD {mixquant.simd_level()}, {platform.processor() or platform.machine()}; "
          f"load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": results, "load": [load0, load1], "args": vars(args)}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
