"""Speed of the roundoff-error table, the clipping search and the whole search.

Compares, in one run and on the weight shapes of ResNet-18 and ResNet-50
(kaiming-normal, seed 0):

* ``native``: ``mixquant.roundoff_error`` on the native backend (one C++ call per layer: per
  channel, each row is read once for its min/max and then served from cache to the quantization
  parameters, all bit-widths and the energy; per tensor, a min/max pass then the fused table);
* ``native_kernel``: that C++ call alone (``_core.minmax_error_table``) on prepared matrices;
* ``reference``: mixquant's pure-PyTorch twin;
* ``torch_loop``: a loop over bit-widths of ``torch.fake_quantize_per_{tensor,channel}_affine``
  plus the squared-error sum (what a user would write with plain torch);

for per-tensor and per-channel quantization with 1 and 2 threads; then the
clipping search (80 ratios x 7 bit-widths) native vs reference, and a whole
``mixquant.search`` of ResNet-50. Two more groups look inside the native call
(ResNet-50, per channel): ``levels`` times it on every SIMD level the machine
has, ``shapes`` on each distinct layer shape alone, repeated on data that
stays in cache (the cost per row shows on short rows). ``weighted`` times the weighted error
table of the data-aware sensitivities (``_core.weighted_error_table``; one weight per column as
for ``sensitivity="input"``, one per element as for ``"fisher"``) against the unweighted native
call and against its reference twin.

    python benchmarks/bench_search.py --json out.json

Prints a table of median times and ratios; ``--json`` writes a list of records
``{"case", "impl", "threads", "median_s"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mixquant  # noqa: E402
from mixquant.io.files import write_text_atomic  # noqa: E402
from resnets import resnet18, resnet50  # noqa: E402

BITS = list(range(2, 9))
GROUPS = ["table", "clip", "search", "levels", "shapes", "weighted"]


def median_time(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def weights_of(model) -> List[torch.Tensor]:
    return [m.weight.detach() for m in mixquant.find_layers(model).values()]


def table_with(weights, per_channel: bool, backend: str, threads: int):
    def run():
        for w in weights:
            mixquant.roundoff_error(w, BITS, per_channel=per_channel, backend=backend, num_threads=threads)
    return run


def kernel_only(weights, per_channel: bool, threads: int):
    """The bare native call behind ``roundoff_error`` (``_core.minmax_error_table``: min/max,
    parameters, table and energy) on float32 matrices prepared beforehand: no Python per layer."""
    from mixquant import _core

    bits = np.asarray(BITS, dtype=np.int32)
    mats = [w.reshape(w.shape[0], -1).contiguous().numpy() for w in weights]

    def run():
        for m in mats:
            _core.minmax_error_table(m, bits, per_channel, False, threads)
    return run


def torch_loop(weights, per_channel: bool):
    """Plain torch: min/max, then per bit-width fake_quantize and the squared-error sum."""
    def run():
        for w in weights:
            m = w.reshape(w.shape[0], -1)
            if per_channel:
                lo = torch.clamp(m.amin(dim=1), max=0)
                hi = torch.clamp(m.amax(dim=1), min=0)
            else:
                lo, hi = torch.clamp(m.min(), max=0), torch.clamp(m.max(), min=0)
            for b in BITS:
                qmax = 2**b - 1
                scale = ((hi - lo) / qmax).clamp_min(torch.finfo(torch.float32).tiny)
                zp = torch.clamp(torch.round(-lo / scale), 0, qmax)
                if per_channel:
                    fq = torch.fake_quantize_per_channel_affine(m, scale, zp.int(), 0, 0, qmax)
                else:
                    fq = torch.fake_quantize_per_tensor_affine(m, float(scale), int(zp), 0, qmax)
                float(((m - fq).double() ** 2).sum())
    return run


def weighted_with(weights, per_element: bool, backend: str, threads: int):
    """The weighted table of every layer for the min/max quantizers (tables and weights prepared beforehand)."""
    from mixquant.core.error import weighted_errors

    g = torch.Generator().manual_seed(0)
    tables = [mixquant.roundoff_error(w, BITS, per_channel=True) for w in weights]
    vs = [torch.rand(w.shape if per_element else (w[0].numel(),), generator=g) for w in weights]

    def run():
        for w, v, t in zip(weights, vs, tables):
            weighted_errors(w, v, t, backend=backend, num_threads=threads)
    return run


def weighted_kernel(weights, per_element: bool, threads: int):
    """The bare native weighted call on prepared matrices, weights and parameters."""
    from mixquant import _core

    g = torch.Generator().manual_seed(0)
    bits = np.asarray(BITS, dtype=np.int32)
    jobs = []
    for w in weights:
        m = w.reshape(w.shape[0], -1).contiguous()
        t = mixquant.roundoff_error(m, BITS, per_channel=True)
        v = torch.rand(m.shape if per_element else (m.shape[1],), generator=g).numpy()
        jobs.append((m.numpy(), v, t.scale, t.zero_point.astype(np.int64)))

    def run():
        for m, v, sc, zp in jobs:
            _core.weighted_error_table(m, v, sc, zp, bits, threads)
    return run


def clip_with(weights, backend: str, threads: int):
    def run():
        for w in weights:
            mixquant.clip_search(w, BITS, per_channel=True, backend=backend, num_threads=threads)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the records to this file")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case (median; default 5)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--only", nargs="+", choices=GROUPS, default=GROUPS,
                        help="which groups of cases to run (default all)")
    parser.add_argument("--clip-repeat", type=int, default=5,
                        help="timed runs of the clipping search (the reference takes minutes at 5)")
    args = parser.parse_args()

    records: List[Dict] = []
    models = {"resnet18": weights_of(resnet18()), "resnet50": weights_of(resnet50())}

    def record(case: str, impl: str, threads: int, fn, repeat: int) -> float:
        torch.set_num_threads(threads)
        t = median_time(fn, repeat)
        records.append({"case": case, "impl": impl, "threads": threads, "median_s": t})
        print(f"  {case:<34} {impl:<11} {threads} thr  {t * 1e3:10.2f} ms", flush=True)
        return t

    print(f"mixquant {mixquant.__version__}, SIMD {mixquant.simd_level()}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    for model, weights in models.items() if "table" in args.only else ():
        n = sum(w.numel() for w in weights)
        for per_channel in (False, True):
            case = f"error_table/{model}/{'per_channel' if per_channel else 'per_tensor'}"
            for threads in args.threads:
                t_ker = record(case, "native_kernel", threads, kernel_only(weights, per_channel, threads), args.repeat)
                t_nat = record(case, "native", threads, table_with(weights, per_channel, "native", threads), args.repeat)
                t_ref = record(case, "reference", threads, table_with(weights, per_channel, "reference", threads), args.repeat)
                t_tql = record(case, "torch_loop", threads, torch_loop(weights, per_channel), args.repeat)
                print(f"    -> {n / 1e6:.1f} M weights, all {len(BITS)} bit-widths: native call alone "
                      f"{n / t_ker / threads / 1e9:.2f} G elem/s/thread, whole roundoff_error "
                      f"{n / t_nat / threads / 1e9:.2f} G elem/s/thread; {t_ref / t_nat:.1f}x vs reference, "
                      f"{t_tql / t_nat:.1f}x vs torch loop")

    weights = models["resnet18"]
    for threads in args.threads if "clip" in args.only else ():
        t_nat = record("clip_search/resnet18/per_channel", "native", threads, clip_with(weights, "native", threads),
                       args.clip_repeat)
        t_ref = record("clip_search/resnet18/per_channel", "reference", threads,
                       clip_with(weights, "reference", threads), args.clip_repeat)
        print(f"    -> clipping search (80 ratios x {len(BITS)} bit-widths): {t_ref / t_nat:.1f}x vs reference")

    model = resnet50()
    for threads in args.threads if "search" in args.only else ():
        t = record("search/resnet50/per_channel/avg_bits=4", "native", threads,
                   lambda: mixquant.search(model, BITS, avg_bits=4.0, num_threads=threads), args.repeat)
        print(f"    -> whole search of ResNet-50 (54 layers, 25.5 M weights): {t * 1e3:.1f} ms")

    weights = models["resnet50"]
    n = sum(w.numel() for w in weights)
    for level in mixquant.supported_simd_levels() if "levels" in args.only else ():
        with mixquant.use_simd_level(level):
            t = record(f"simd_level/resnet50/per_channel/{level}", "native_kernel", 1,
                       kernel_only(weights, True, 1), args.repeat)
        print(f"    -> {level}: {n / t / 1e9:.2f} G elem/s")

    shapes = sorted({tuple(w.reshape(w.shape[0], -1).shape) for w in weights}, key=lambda s: (s[1], s[0]))
    for c, k in shapes if "shapes" in args.only else ():
        m = torch.nn.init.kaiming_normal_(torch.empty(c, k), generator=torch.Generator().manual_seed(0))
        t = record(f"shape/resnet50/{c}x{k}", "native_kernel", 1, kernel_only([m], True, 1), args.repeat)
        print(f"    -> rows of {k}: {c * k / t / 1e9:.2f} G elem/s, {t / c * 1e9:.0f} ns per row")

    weights = models["resnet50"]
    n = sum(w.numel() for w in weights)
    for threads in args.threads if "weighted" in args.only else ():
        case = "weighted_table/resnet50/per_channel"
        t_plain = record(case, "plain_kernel", threads, kernel_only(weights, True, threads), args.repeat)
        for per_element, label in ((False, "per_column"), (True, "per_element")):
            t_ker = record(f"{case}/{label}", "native_kernel", threads, weighted_kernel(weights, per_element, threads),
                           args.repeat)
            t_nat = record(f"{case}/{label}", "native", threads, weighted_with(weights, per_element, "native", threads),
                           args.repeat)
            t_ref = record(f"{case}/{label}", "reference", threads,
                           weighted_with(weights, per_element, "reference", threads), max(1, args.repeat // 2))
            print(f"    -> {label} weights: native call {t_ker / t_plain:.2f}x the unweighted table's time, "
                  f"{n / t_ker / threads / 1e9:.2f} G elem/s/thread; weighted_errors {t_ref / t_nat:.1f}x vs reference")

    if args.json:
        write_text_atomic(args.json, json.dumps(records, indent=1), overwrite=True)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
