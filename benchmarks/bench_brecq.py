"""Benchmark of mixquant's BRECQ on CPU: reconstruction speed, scale initialisation, memory.

For a ResNet-20-shaped network (CIFAR layout, 3x32x32 input) and a
MobileNetV2-shaped network (width 0.5, CIFAR strides, 3x32x32 input), with
random weights, random BN statistics and random calibration data:

* seconds per AdaRound iteration for every block (the median over its
  iterations), and the median over blocks;
* the time of the clipping-range scale initialisation (``choose_qparams``,
  ``clip="mse"``, ``p=2.4``, per channel) of all layers, native vs reference
  backend, in the same run;
* peak resident memory (``resource.getrusage``) and the largest reconstruction cache;
* one reconstruction iteration of a residual block with mixquant's machinery
  (:func:`mixquant.methods.brecq.make_step`) versus the same loop written with
  plain torch ops (functional convolutions with the soft-quantized weights
  computed inline, BRECQ-style), timed alternately iteration by iteration.

Usage::

    python benchmarks/bench_brecq.py [--iters 20] [--samples 64] [--threads 1] [--json out.json]

Small blocks are overhead-bound, so the default is one torch thread (much
faster on a shared machine; ``--threads 0`` keeps torch's default).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import mixquant
from mixquant.nn.fold import fold_bn
from mixquant.methods import adaround
from mixquant.methods.adaround import GAMMA, ZETA, AdaRound
from mixquant.methods.brecq import BrecqOptions, make_step
from mixquant.methods.cache import UnitData
from mixquant.api.quantize import quantize

# --------------------------------------------------------------------------- networks


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + idt)


class ResNet20(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for i, c in enumerate((16, 32, 64)):
            blocks = []
            for j in range(3):
                blocks.append(BasicBlock(cin, c, 2 if (j == 0 and i > 0) else 1))
                cin = c
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers: List[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 layout (t, c, n, s) at width 0.5 with CIFAR strides."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, width: float = 0.5, classes: int = 10) -> None:
        super().__init__()
        ch = lambda c: max(8, int(c * width + 4) // 8 * 8)  # noqa: E731
        cin = ch(32)
        feats: List[nn.Module] = [nn.Sequential(nn.Conv2d(3, cin, 3, 1, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6())]
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                feats.append(InvertedResidual(cin, ch(c), s if i == 0 else 1, t))
                cin = ch(c)
        last = 1280 if width <= 1 else ch(1280)
        feats.append(nn.Sequential(nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Linear(last, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
    return model.eval()


# --------------------------------------------------------------------------- plain torch loop


def _soft_weight_inline(w: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, qmax: float, V: torch.Tensor) -> torch.Tensor:
    """BRECQ-style AdaRound weight, recomputed from scratch every iteration."""
    w_floor = torch.floor(w / s)
    h = torch.clamp(torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)
    return (torch.clamp(w_floor + h + zp, 0, qmax) - zp) * s


def _plain_forward_basic(block: BasicBlock, ws: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    c1, c2 = block.conv1, block.conv2
    out = torch.relu(F.conv2d(x, ws["conv1"], c1.bias, c1.stride, c1.padding))
    out = F.conv2d(out, ws["conv2"], c2.bias, c2.stride, c2.padding)
    if block.downsample is not None:
        d = block.downsample[0]
        x = F.conv2d(x, ws["downsample.0"], d.bias, d.stride, d.padding)
    return torch.relu(out + x)


def _plain_forward_inverted(block: InvertedResidual, ws: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = x
    for name, m in block.conv.named_children():
        if isinstance(m, nn.Conv2d):
            h = F.conv2d(h, ws[f"conv.{name}"], m.bias, m.stride, m.padding, m.dilation, m.groups)
        elif isinstance(m, nn.ReLU6):
            h = F.hardtanh(h, 0.0, 6.0)
    return x + h if block.use_res_connect else h


def _loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).square().reshape(pred.shape[0], -1).sum(1).mean()


def _qparams(layer: nn.Module, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return mixquant.choose_qparams(layer.weight.detach(), bits, per_channel=True, clip="mse", p=2.4)


def plain_step(block: nn.Module, forward: Callable, data: UnitData, bits: int, batch: int) -> Callable[[], None]:
    """One iteration of a hand-written AdaRound loop over ``block`` (plain torch ops)."""
    layers = {n: m for n, m in block.named_modules() if isinstance(m, nn.Conv2d)}
    qmax = float(2**bits - 1)
    state = {}
    for name, m in layers.items():
        s, z = _qparams(m, bits)
        s, z = s.reshape(-1, 1, 1, 1), z.float().reshape(-1, 1, 1, 1)
        w = m.weight.detach()
        frac = w / s - torch.floor(w / s)
        p = (frac - GAMMA) / (ZETA - GAMMA)
        state[name] = (w, s, z, torch.log(p / (1 - p)).requires_grad_(True))
    opt = torch.optim.Adam([v[3] for v in state.values()], lr=1e-3)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        idx = torch.randperm(len(data), generator=gen)[:batch]
        ws = {n: _soft_weight_inline(w, s, z, qmax, V) for n, (w, s, z, V) in state.items()}
        loss = _loss(forward(block, ws, data.x[idx]), data.y[idx])
        reg = 0.0
        for _, _, _, V in state.values():
            h = torch.clamp(torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)
            reg = reg + (1 - (2 * h - 1).abs().pow(10.0)).sum()
        loss = loss + 0.01 * reg
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def ours_step(block: nn.Module, data: UnitData, bits: int, batch: int, iters: int) -> Tuple[Callable[[], None], Callable[[], None]]:
    """One iteration of mixquant's reconstruction (``make_step``) over ``block``, and an undo function."""
    layers = {n: m for n, m in block.named_modules() if isinstance(m, nn.Conv2d)}
    roundings, originals = [], {}
    for name, m in layers.items():
        s, z = _qparams(m, bits)
        r = AdaRound(m.weight.detach(), s, z, bits, 0)
        originals[name] = adaround.attach(m, r)
        roundings.append(r)
    # warmup=0 so every timed iteration includes the regulariser, as in the plain loop
    step = make_step(block, data, roundings, BrecqOptions(iters=iters, batch_size=batch, warmup=0.0),
                     torch.Generator().manual_seed(0))
    counter = iter(range(10**9))

    def undo() -> None:
        for name, m in layers.items():
            adaround.detach(m, originals[name])

    return (lambda: step(next(counter))), undo


def compare_iteration(block: nn.Module, plain_fwd: Callable, data: UnitData, bits: int, batch: int, iters: int) -> Tuple[float, float]:
    """Median seconds per iteration, (mixquant, plain torch), timed alternately iteration by iteration."""
    plain_block = copy.deepcopy(block)
    plain = plain_step(plain_block, plain_fwd, data, bits, batch)
    ours, undo = ours_step(block, data, bits, batch, iters)
    t_ours, t_plain = [], []
    try:
        for _ in range(3):  # warm-up
            ours()
            plain()
        for _ in range(iters):
            t = time.perf_counter()
            ours()
            t_ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            plain()
            t_plain.append(time.perf_counter() - t)
    finally:
        undo()
    return statistics.median(t_ours), statistics.median(t_plain)


def block_data(model: nn.Module, block: nn.Module, x: torch.Tensor) -> UnitData:
    cache = {}

    def hook(_m, args, out):
        cache["x"], cache["y"] = args[0].detach(), out.detach()

    h = block.register_forward_hook(hook)
    with torch.no_grad():
        model(x)
    h.remove()
    return UnitData(cache["x"], cache["y"])


# --------------------------------------------------------------------------- main


def scale_init_seconds(model: nn.Module, bits: int, backend: str, repeat: int = 3) -> float:
    layers = mixquant.find_layers(model)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for m in layers.values():
            mixquant.choose_qparams(m.weight.detach(), bits, per_channel=True, clip="mse", p=2.4,
                                    ch_axis=mixquant.channel_axis(m), backend=backend)
        best = min(best, time.perf_counter() - t)
    return best


def run(name: str, build: Callable[[], nn.Module], probe: str, plain_fwd: Callable, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = randomize_bn(build())
    x = torch.randn(args.samples, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cfg = mixquant.uniform(model, args.bits, errors=False, keep=mixquant.keep_first_last(model, x[:1]))
    folded = fold_bn(model)
    rec = {"network": name, "params": sum(p.numel() for p in model.parameters()), "layers": len(cfg.bits),
           "bits": args.bits, "iters": args.iters, "samples": args.samples, "batch_size": args.batch}
    try:
        rec["scale_init_native_s"] = scale_init_seconds(folded, args.bits, "native")
    except ImportError:
        rec["scale_init_native_s"] = None
    rec["scale_init_reference_s"] = scale_init_seconds(folded, args.bits, "reference", repeat=1)

    t = time.perf_counter()
    q = quantize(model, cfg, "brecq", calib_data=x, iters=args.iters, num_samples=args.samples,
                 batch_size=args.batch, progress=False)
    rec["brecq_total_s"] = time.perf_counter() - t
    report = q.mixquant_report
    blocks = [r for r in report.records if r.kind == "block"]
    rec["blocks"] = {r.unit: r.median_iter_s for r in blocks}
    rec["block_iter_median_s"] = statistics.median(r.median_iter_s for r in blocks)
    rec["block_iter_max_s"] = max(r.median_iter_s for r in blocks)
    rec["peak_cache_bytes"] = report.peak_cache_bytes

    block = folded.get_submodule(probe)
    block.requires_grad_(False)  # as during reconstruction: only the rounding variables learn
    data = block_data(folded, block, x)
    rec["probe_block"] = probe
    rec["iter_ours_s"], rec["iter_plain_s"] = compare_iteration(
        block, plain_fwd, data, args.bits, args.batch, max(args.iters, 40))
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=20, help="AdaRound iterations per block (default 20)")
    ap.add_argument("--samples", type=int, default=128, help="calibration samples (default 128)")
    ap.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    ap.add_argument("--bits", type=int, default=4, help="weight bits (default 4)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, 0 = torch's default (default 1)")
    ap.add_argument("--json", help="write the records to this file")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    nets = [
        ("resnet20", ResNet20, "layer2.0", _plain_forward_basic),
        ("mobilenetv2-0.5", MobileNetV2, "features.3", _plain_forward_inverted),
    ]
    records = [run(*net, args) for net in nets]
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for r in records:
        r["peak_rss_mb"] = rss_kb / 1024
        r["threads"] = torch.get_num_threads()
        r["torch"] = torch.__version__
        r["machine"] = platform.processor() or platform.machine()

    def ms(v):
        return "n/a" if v is None else f"{v * 1e3:.2f}"

    head = ("network", "params", "blocks", "ms/iter/block (median, max)", "scale init ms native / reference",
            "iter ms ours / plain torch", "cache MB", "peak RSS MB")
    rows = [head]
    for r in records:
        speedup = (f" ({r['scale_init_reference_s'] / r['scale_init_native_s']:.0f}x)"
                   if r["scale_init_native_s"] else "")
        rows.append((
            r["network"], f"{r['params'] / 1e3:.0f}k", str(len(r["blocks"])),
            f"{ms(r['block_iter_median_s'])}, {ms(r['block_iter_max_s'])}",
            f"{ms(r['scale_init_native_s'])} / {ms(r['scale_init_reference_s'])}{speedup}",
            f"{ms(r['iter_ours_s'])} / {ms(r['iter_plain_s'])} ({r['probe_block']})",
            f"{r['peak_cache_bytes'] / 2**20:.1f}", f"{r['peak_rss_mb']:.0f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\n{args.samples} samples, batch {args.batch}, {args.iters} iterations per block, W{args.bits} "
          f"(first/last 8), torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
