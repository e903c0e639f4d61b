"""BRECQ reconstruction across ranks: one unit timed on 1 and 2 ranks, the all-reduce, and a ResNet-50 projection.

Three parts, one command (every figure printed is measured in this run, or
computed from measured figures by the model written out below):

1. **One unit, three ways on this host**: a ResNet-20 BasicBlock (16 channels,
   28x28, from :mod:`mixquant.zoo`) and a ResNet-50 stage-1 bottleneck (256 ->
   64 -> 256 channels, at ``--r50-size`` instead of 56x56 to keep it short),
   ``mixquant.methods.brecq.make_step`` iterations (batch ``--batch``, the
   regulariser on) with 1 rank x 1 thread, 1 rank x 2 threads and 2 ranks x 1
   thread (``torch.distributed``, gloo over loopback, each rank holding half
   the cache). On a 2-core host the fair comparison of 2 ranks x 1 thread is
   1 rank x 2 threads: both use both cores. Every worker process is set up as
   the ``mixquant`` command sets itself up (:func:`mixquant.prepare_process`:
   OpenMP's passive wait, malloc thresholds). Per iteration: the median wall
   time, and for 2 ranks the part spent in the gradient's all-reduce (which
   includes waiting for the other rank: the random batch splits unevenly).
2. **The all-reduce alone** (2 ranks, gloo, loopback) for the gradient sizes
   of the units, fitted as ``latency + bytes / bandwidth``.
3. **ResNet-50 at the paper's settings** (1,024 calibration images, 20,000
   iterations per unit, batch 32, 224x224): every distinct unit shape of
   ResNet-50 (the stem, the first and a later bottleneck of each stage, the
   classifier) is timed on 1 rank x 1 thread at batch 32 and 8 at full
   resolution, which splits its iteration into a part per sample and a fixed
   part (the fused rounding step over all the unit's weights, which every rank
   repeats). The wall time on ``H`` hosts of ``--cores-per-host`` cores (one
   rank x 1 thread per core, ``R = H x cores`` ranks) is then projected as::

       T(H) = iters x sum over units u of
              [ fixed_u + per_sample_u x E[max_r m_r] + allreduce(4 x weights_u bytes, R) ]

   where ``m_r`` is how many of the batch's 32 samples rank ``r`` holds (drawn
   as mixquant draws them: 32 distinct indices of 1,024, ranks holding
   contiguous blocks; the expectation of the largest share is simulated, it is
   what the slowest rank computes), and ``allreduce`` is a ring all-reduce:
   ``2 (R - 1) x latency + 2 (R - 1) / R x bytes / bandwidth``. Within one
   host the measured loopback figures are used; between hosts, an assumed
   network (``--net-gbit`` 10 Gbit/s, ``--net-latency-us`` 50 us per ring
   step). Caching (one forward pass per unit) and the evaluations are left
   out: they are a few passes over 1,024 images, against 20,000 iterations.

Usage::

    python benchmarks/bench_distributed.py [--iters 10] [--batch 32] [--r50-size 28] [--cores-per-host 2]
                                           [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

if "--worker" in sys.argv:  # what the mixquant command does first, before torch is imported (OpenMP's wait)
    from mixquant.core.runtime import prepare_process

    prepare_process()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

# ---- the units ----


class Bottleneck(nn.Module):
    """ResNet-50's bottleneck (torchvision's layout: stride on the 3x3 convolution)."""

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * 4
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + identity)


def _unit(kind: str, size: int) -> Tuple[nn.Module, Tuple[int, ...]]:
    """A unit and its per-sample input shape. Kinds: ``r20`` (ResNet-20 BasicBlock), ``stem``, ``fc``,
    ``s<stage>a`` (a stage's first bottleneck) and ``s<stage>b`` (a later one), at input ``size``."""
    from mixquant.zoo.models import BasicBlock

    if kind == "r20":
        return BasicBlock(16, 16), (16, size, size)
    if kind == "stem":
        return nn.Conv2d(3, 64, 7, 2, 3, bias=False), (3, size, size)
    if kind == "fc":
        return nn.Linear(2048, 1000), (2048,)
    stage, first = int(kind[1]), kind[2] == "a"
    planes = 64 * 2 ** (stage - 1)
    cin = (64 if stage == 1 else planes * 2) if first else planes * 4
    return Bottleneck(cin, planes, 2 if first and stage > 1 else 1), (cin, size, size)


# Every distinct unit shape of ResNet-50 at 224x224: (kind, input size, how many such units).
R50_UNITS = [("stem", 224, 1), ("s1a", 56, 1), ("s1b", 56, 2), ("s2a", 56, 1), ("s2b", 28, 3),
             ("s3a", 28, 1), ("s3b", 14, 5), ("s4a", 14, 1), ("s4b", 7, 2), ("fc", 1, 1)]


def _weights(unit: nn.Module) -> int:
    return sum(m.weight.numel() for m in unit.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


# ---- one rank's measurement (run in a worker process) ----


def _prepare(kind: str, size: int, samples: int, batch: int, shard):
    """The folded unit with AdaRound attached (4 bits) and this rank's block of its cache."""
    import mixquant
    from mixquant.methods import adaround
    from mixquant.methods.cache import UnitData, capture_inputs, capture_targets, probe_unit
    from mixquant.nn.fold import fold_bn

    torch.manual_seed(0)
    unit, shape = _unit(kind, size)
    unit = fold_bn(unit.eval()).eval().requires_grad_(False)
    x = torch.randn(samples, *shape, generator=torch.Generator().manual_seed(1))
    cpu = torch.device("cpu")
    cache = probe_unit(unit, unit, x, batch, cpu)
    inp = capture_inputs(unit, unit, x, batch, cpu, cache)
    out, _ = capture_targets(unit, unit, x, batch, cpu, cache)
    data = UnitData(shard.take(inp), shard.take(out), None, -1 if isinstance(unit, nn.Linear) else 1)
    roundings = []
    for m in [m for m in unit.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]:
        ch = mixquant.channel_axis(m)
        s, z = mixquant.choose_qparams(m.weight.detach(), 4, per_channel=True, clip="mse", p=2.4, ch_axis=ch)
        r = adaround.AdaRound(m.weight.detach(), s, z, 4, ch)
        adaround.attach(m, r)
        roundings.append(r)
    return unit, data, roundings


def _time_steps(kind: str, size: int, samples: int, batches: Sequence[int], iters: int, shard) -> List[dict]:
    """Per batch size: the median seconds of one iteration, of its gradient all-reduce (0 on one rank) and of
    its fused rounding step. The batch sizes' iterations alternate (one unit copy each), so a change of load
    on a shared machine reaches all of them alike."""
    from mixquant.methods import adaround, data_parallel
    from mixquant.methods.brecq import BrecqOptions, make_step

    steps, finish = [], []
    for b in batches:
        unit, data, roundings = _prepare(kind, size, samples, b, shard)
        opts = BrecqOptions(iters=10**6, batch_size=b, warmup=0.0, beta_range=(10.0, 10.0))
        step, state = make_step(unit, data, roundings, opts, torch.Generator().manual_seed(0), shard=shard)
        steps.append(step)
        finish.append(state.finish)
    spent: Dict[str, List[float]] = {"reduce": [], "rounding": []}

    def timed(fn, key):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key].append(time.perf_counter() - t)
        return wrapper

    summed, rounding_step = data_parallel.Shard.summed, adaround.UnitRounding.step
    data_parallel.Shard.summed = timed(summed, "reduce")
    adaround.UnitRounding.step = timed(rounding_step, "rounding")
    found = [{"iter": [], "reduce": [], "rounding": []} for _ in batches]
    try:
        for it in range(2 + iters):  # 2 of warm-up: first calls allocate and pick kernels
            for k, step in enumerate(steps):
                spent["reduce"].clear()
                spent["rounding"].clear()
                t = time.perf_counter()
                step(it)
                if it >= 2:
                    found[k]["iter"].append(time.perf_counter() - t)
                    found[k]["reduce"].append(sum(spent["reduce"]))
                    found[k]["rounding"].append(sum(spent["rounding"]))
    finally:
        data_parallel.Shard.summed, adaround.UnitRounding.step = summed, rounding_step
        for f in finish:
            f()
    weights = _weights(_unit(kind, size)[0])
    return [{"kind": kind, "size": size, "batch": b, "weights": weights, "iter_s": statistics.median(f["iter"]),
             "reduce_s": statistics.median(f["reduce"]), "rounding_s": statistics.median(f["rounding"])}
            for b, f in zip(batches, found)]


def _time_allreduce(workers, floats: Sequence[int], reps: int) -> List[dict]:
    """Median seconds of a gloo all-reduce of a float32 tensor of each size (after a barrier each time)."""
    from mixquant.parallel import comm

    rows = []
    for n in floats:
        t = torch.ones(n)
        comm.all_reduce_(workers, t)  # warm-up (connection buffers)
        times = []
        for _ in range(reps):
            comm.barrier(workers)
            start = time.perf_counter()
            comm.all_reduce_(workers, t)
            times.append(time.perf_counter() - start)
        rows.append({"floats": n, "bytes": 4 * n, "s": statistics.median(times)})
    return rows


def worker(args: argparse.Namespace) -> int:
    """One rank: time the units of ``--job`` (a JSON list) and, with 2 ranks, the all-reduce; rank 0 writes."""
    from mixquant.methods.data_parallel import Shard
    from mixquant.parallel import launch

    job = json.loads(args.job)
    w = launch.init()
    torch.set_num_threads(job["threads"])
    rows = []
    for kind, size, batches in job["units"]:
        rows += _time_steps(kind, size, job["samples"], batches, job["iters"], Shard.of(w, job["samples"]))
    found = {"units": rows, "allreduce": _time_allreduce(w, job["allreduce"], job["reps"]) if w.distributed else []}
    if w.is_main:
        with open(args.out, "w") as fh:
            json.dump(found, fh)
    return 0


# ---- the driver ----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_job(job: dict, ranks: int, timeout_s: float) -> dict:
    """Run ``job`` on ``ranks`` fresh processes on this host (gloo over loopback); rank 0's findings."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "found.json")
        port = _free_port()
        procs = []
        for r in range(ranks):
            env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), GLOO_SOCKET_IFNAME="lo",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), LOCAL_RANK=str(r),
                       WORLD_SIZE=str(ranks), MIXQUANT_DIST_TIMEOUT=str(timeout_s))
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", "--job",
                                           json.dumps(job), "--out", out], env=env))
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout_s))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise SystemExit(f"a worker did not finish within {timeout_s} s")
        if any(codes):
            raise SystemExit(f"worker exit codes {codes}")
        with open(out) as fh:
            return json.load(fh)


def fit_allreduce(rows: List[dict]) -> Tuple[float, float]:
    """``latency + bytes / bandwidth`` from the measured all-reduces: (latency s, bytes/s).

    The latency is the fastest all-reduce of at most 64 KB; the bandwidth the median over the
    sizes of 1 MB and more of ``bytes / (time - latency)`` (robust to the odd
    slow repetition on a shared machine, unlike a least-squares line).
    """
    latency = min(r["s"] for r in rows if r["bytes"] <= 1 << 16)
    big = [r["bytes"] / max(r["s"] - latency, 1e-9) for r in rows if r["bytes"] >= 1 << 20]
    return latency, statistics.median(big) if big else math.inf


def expected_busiest(ranks: int, samples: int = 1024, batch: int = 32, draws: int = 4000) -> float:
    """E[the largest number of a batch's samples that one rank holds], drawn as mixquant draws them."""
    from mixquant.parallel.shards import block

    if ranks == 1:
        return float(min(batch, samples))
    bounds = torch.tensor([block(samples, r, ranks)[1] for r in range(ranks)])
    g = torch.Generator().manual_seed(0)
    total = 0
    for _ in range(draws):
        idx = torch.randperm(samples, generator=g)[:batch]
        total += int(torch.bincount(torch.bucketize(idx, bounds, right=True), minlength=ranks).max())
    return total / draws


def ring_allreduce_s(nbytes: float, ranks: int, latency_s: float, bandwidth: float) -> float:
    """A ring all-reduce of ``nbytes`` over ``ranks``: 2 (R - 1) steps, each moving bytes / R."""
    if ranks == 1:
        return 0.0
    return 2 * (ranks - 1) * latency_s + 2 * (ranks - 1) / ranks * nbytes / bandwidth


def table(header: List[str], rows: List[List[str]]) -> str:
    body = [header] + rows
    widths = [max(len(r[i]) for r in body) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in body]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _hours(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=10, help="timed iterations per unit and set-up (default 10)")
    ap.add_argument("--batch", type=int, default=32, help="batch of part 1 (default 32)")
    ap.add_argument("--samples", type=int, default=64, help="cached samples of part 1 (default 64)")
    ap.add_argument("--r50-size", type=int, default=28, help="input size of part 1's ResNet-50 bottleneck (56 in "
                    "ResNet-50; default 28)")
    ap.add_argument("--cores-per-host", type=int, default=2, help="ranks (one per core) per projected host")
    ap.add_argument("--net-gbit", type=float, default=10.0, help="assumed network bandwidth between hosts, Gbit/s")
    ap.add_argument("--net-latency-us", type=float, default=50.0, help="assumed latency per ring step between hosts")
    ap.add_argument("--hosts", default="1,8,64", help="host counts of the projection (default 1,8,64)")
    ap.add_argument("--quick", action="store_true", help="a short smoke run (few iterations, small shapes)")
    ap.add_argument("--json", help="write every measurement to this file")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds a measuring job may take")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    for name in ("iters", "batch", "samples", "r50_size", "cores_per_host"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.samples < max(args.batch, 2):
        ap.error("--samples must be at least --batch (and 2: the ranks share them)")
    hosts = [int(h) for h in args.hosts.split(",")]
    iters, r50 = (3, 14) if args.quick else (args.iters, args.r50_size)
    load0 = os.getloadavg()

    # 1. one unit, three ways
    part1 = [("r20", 28, [args.batch]), ("s1b", r50, [args.batch])]
    base = {"units": part1, "samples": args.samples, "iters": iters, "allreduce": [], "reps": 0}
    grads = sorted({_weights(_unit(k, s)[0]) + 1 for k, s, _ in R50_UNITS} | {_weights(_unit("r20", 28)[0]) + 1})
    sizes = sorted(set(grads) | {1, 10**3, 10**4, 10**5, 10**6})
    runs = {}
    for label, ranks, threads in (("1 rank x 1 thread", 1, 1), ("1 rank x 2 threads", 1, 2),
                                  ("2 ranks x 1 thread", 2, 1)):
        job = dict(base, threads=threads, allreduce=sizes if ranks == 2 else [], reps=3 if args.quick else 20)
        runs[label] = launch_job(job, ranks, args.timeout)
        print(f"  measured {label}", file=sys.stderr, flush=True)
    load1 = os.getloadavg()

    # 3. ResNet-50's unit shapes at full resolution, 1 rank x 1 thread, batch 32 and 8
    shapes = [(k, 7 if args.quick and s > 7 and k != "stem" else (32 if args.quick and k == "stem" else s), n)
              for k, s, n in R50_UNITS]
    job = {"units": [(k, s, [32, 8]) for k, s, _ in shapes], "samples": 40, "iters": iters,
           "threads": 1, "allreduce": [], "reps": 0}
    profile = launch_job(job, 1, args.timeout)["units"]
    load2 = os.getloadavg()

    # ---- tables ----
    out = [f"## One unit on this host (batch {args.batch}, {args.samples} cached samples, median of {iters} "
           "iterations)", ""]
    rows = []
    names = {"r20": "ResNet-20 BasicBlock 16ch 28x28", "s1b": f"ResNet-50 bottleneck 256-64-256 {r50}x{r50}"}
    for i, (kind, size, _) in enumerate(part1):
        one = runs["1 rank x 1 thread"]["units"][i]["iter_s"]
        for label, found in runs.items():
            u = found["units"][i]
            compute = u["iter_s"] - u["reduce_s"]
            rows.append([names[kind], str(u["weights"]), label, f"{u['iter_s'] * 1e3:.2f}",
                         f"{compute * 1e3:.2f}", f"{u['reduce_s'] * 1e3:.2f}" if label.startswith("2") else "-",
                         f"{one / u['iter_s']:.2f}x"])
    out.append(table(["unit", "weights", "set-up", "ms / iteration", "compute ms", "in-step all-reduce ms",
                      "speed-up vs 1x1"], rows))
    out += ["", "On 2 cores, 2 ranks x 1 thread is to be compared with 1 rank x 2 threads (both use both cores). "
            "The in-step all-reduce includes waiting for the other rank (the batch splits unevenly).", ""]

    ar = runs["2 ranks x 1 thread"]["allreduce"]
    lat, bw = fit_allreduce(ar)
    out += ["## All-reduce alone, 2 ranks, gloo over loopback (median after a barrier)", ""]
    out.append(table(["floats", "bytes", "ms", "GB/s"],
                     [[str(r["floats"]), str(r["bytes"]), f"{r['s'] * 1e3:.3f}", f"{r['bytes'] / r['s'] / 1e9:.2f}"]
                      for r in ar]))
    out += ["", f"model: latency {lat * 1e6:.0f} us (the fastest of at most 64 KB) + bytes / {bw / 1e9:.2f} GB/s "
            "(median over the sizes of 1 MB and more; loopback)", ""]

    # per-unit split of the iteration into a fixed part and a part per sample
    per: Dict[str, dict] = {}
    for kind, size, count in shapes:
        t32 = next(u for u in profile if u["kind"] == kind and u["batch"] == 32)
        t8 = next(u for u in profile if u["kind"] == kind and u["batch"] == 8)
        # the line through batch 8 and 32; the fixed part is at least the fused rounding step, which every
        # rank repeats whatever its share of the batch
        rounding = statistics.fmean([t32["rounding_s"], t8["rounding_s"]])
        fixed = min(max((32 * t8["iter_s"] - 8 * t32["iter_s"]) / 24, rounding), t8["iter_s"])
        per[kind] = {"size": size, "count": count, "weights": t32["weights"], "t32": t32["iter_s"],
                     "t8": t8["iter_s"], "rounding": rounding, "fixed": fixed,
                     "per_sample": (t32["iter_s"] - fixed) / 32}
    out += ["## ResNet-50 units, 1 rank x 1 thread (median of "
            f"{iters} iterations; the fixed part is what every rank repeats)", ""]
    out.append(table(["unit", "input", "units", "weights", "batch 32 ms", "batch 8 ms", "rounding step ms",
                      "fixed ms", "per sample ms"],
                     [[k, f"{p['size']}x{p['size']}", str(p["count"]), str(p["weights"]), f"{p['t32'] * 1e3:.1f}",
                       f"{p['t8'] * 1e3:.1f}", f"{p['rounding'] * 1e3:.2f}", f"{p['fixed'] * 1e3:.1f}",
                       f"{p['per_sample'] * 1e3:.2f}"] for k, p in per.items()]))
    out += ["", "fixed = the batch-0 intercept of the line through batch 8 and 32, at least the rounding step; "
            "per sample = (batch 32 - fixed) / 32."]

    net_bw, net_lat = args.net_gbit * 1e9 / 8, args.net_latency_us * 1e-6
    proj = []
    for h in hosts:
        ranks = h * args.cores_per_host
        busiest = expected_busiest(ranks)
        comp = sum(p["count"] * (p["fixed"] + p["per_sample"] * busiest) for p in per.values())
        lat_h, bw_h = (lat, bw) if h == 1 else (net_lat, net_bw)  # one host: loopback; several: the network
        comm_s = sum(p["count"] * ring_allreduce_s(4 * (p["weights"] + 1), ranks, lat_h, bw_h) for p in per.values())
        proj.append([str(h), str(ranks), f"{busiest:.2f}", f"{comp * 1e3:.0f}", f"{comm_s * 1e3:.1f}",
                     _hours(20000 * (comp + comm_s))])
    one_core = sum(p["count"] * p["t32"] for p in per.values())
    out += ["", f"## Projection: ResNet-50, 1,024 images, 20,000 iterations per unit, batch 32 ({len(R50_UNITS)} "
            f"shapes, {sum(p['count'] for p in per.values())} units)", ""]
    out.append(table(["hosts", "ranks", "E[busiest rank's samples]", "compute ms / iteration (all units)",
                      "all-reduce ms / iteration (all units)", "wall time"], proj))
    out += ["", f"T(H) = 20000 x sum_u [fixed_u + per_sample_u x E[max share] + ring(4 x weights_u B, R = H x "
            f"{args.cores_per_host})]; one rank per core, 1 thread; one core alone: {_hours(20000 * one_core)}. "
            f"Between hosts an assumed {args.net_gbit:g} Gbit/s and {args.net_latency_us:g} us per ring step "
            f"(not measured here); within one host the loopback model above. Caching and evaluations excluded.", ""]
    load3 = os.getloadavg()
    out.append(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
               f"load average {load0[0]:.2f} at the start, {load1[0]:.2f} after part 1, {load2[0]:.2f} after the "
               f"ResNet-50 profile, {load3[0]:.2f} at the end" + (" (--quick: shapes reduced, not ResNet-50's)"
                                                                    if args.quick else ""))
    print("\n".join(out))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"part1": runs, "profile": profile, "projection": proj, "loads": [load0, load1, load2, load3],
                       "args": {k: v for k, v in vars(args).items() if k not in ("worker", "job", "out")}}, fh,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
