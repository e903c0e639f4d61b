"""The fused packed matrix-vector product against the machine's memory bandwidth and torch.mv on float32 weights.

    python benchmarks/bench_matvec.py [--threads 1 2] [--bits 2 3 4 8] [--mib 256] [--repeat 5] [--json out.json]

* ``stream``: a STREAM-like copy (``b = a``) and triad (``a = b + s * c``) on torch
  float32 arrays of ``--mib`` MiB each (well past the last-level cache), counted as
  STREAM counts them (copy: 2 arrays moved, triad: 3), per thread count.
* ``matvec``: the packed matrix-vector product (``mixquant.core.kernels.matvec_packed``, the
  call of the packed runtime; ``mixquant.packed_matvec`` validates its arguments first) of one float32 vector with an LLM-shaped
  weight (SmolLM2-135M's 576x576, 1536x576, 576x1536; LLaMA-7B's 4096x4096,
  11008x4096) at 2/3/4/8 bits per channel, native at the best SIMD level; and
  ``torch.mv`` of the same vector with the float32 weight. Each is run over enough
  copies of its weight to fill ``--mib`` MiB, cycled, so that the weights come from
  memory as a model's layers do, not from the cache. Per case: microseconds per
  product (median over ``--repeat`` passes over all copies), GB/s of weights read
  (packed bytes for the fused kernel, float32 bytes for ``torch.mv``) and the
  fraction of the measured triad bandwidth.

Timings depend on the load of the machine (``os.getloadavg()`` is printed with each table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096)]


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_runtime import _load, _median_time as _median  # noqa: E402  (the sibling script's timers)


def bench_stream(mib: int, threads: int, repeat: int) -> dict:
    n = mib * 2**20 // 4
    a, b, c = torch.ones(n), torch.full((n,), 2.0), torch.full((n,), 0.5)
    torch.set_num_threads(threads)
    t_copy = _median(lambda: b.copy_(a), repeat)
    t_triad = _median(lambda: torch.add(b, c, alpha=3.0, out=a), repeat)
    return {"threads": threads, "copy_GB_s": 2 * 4 * n / t_copy / 1e9, "triad_GB_s": 3 * 4 * n / t_triad / 1e9}


def bench_case(shape, bits: int, threads: int, mib: int, repeat: int) -> dict:
    import mixquant
    from mixquant.core.kernels import matvec_packed

    c, k = shape
    rng = np.random.default_rng(0)
    nbytes = (c * k * bits + 7) // 8
    copies = max(1, math.ceil(mib * 2**20 / nbytes))
    base = torch.from_numpy(mixquant.pack_bits(rng.integers(0, 2**bits, size=c * k), bits))
    weights = [base.clone() for _ in range(copies)]
    scale = torch.rand(c) * 0.01 + 1e-3
    zp = torch.randint(0, 2**bits, (c,), dtype=torch.int32)
    x = torch.randn(1, k)
    out = torch.empty(c)

    def run():  # the call a packed Linear makes for a one-row input (the public packed_matvec checks more first)
        for w in weights:
            matvec_packed(w, bits, c, k, k, scale, zp, x, out=out, num_threads=threads)

    t = _median(run, repeat) / copies
    return {"shape": list(shape), "bits": bits, "threads": threads, "copies": copies, "us": 1e6 * t,
            "GB_s": nbytes / t / 1e9}


def bench_mv(shape, threads: int, mib: int, repeat: int) -> dict:
    c, k = shape
    copies = max(1, math.ceil(mib * 2**20 / (4 * c * k)))
    weights = [torch.randn(c, k) for _ in range(copies)]
    x, out = torch.randn(k), torch.empty(c)
    torch.set_num_threads(threads)

    def run():
        for w in weights:
            torch.mv(w, x, out=out)

    t = _median(run, repeat) / copies
    return {"shape": list(shape), "threads": threads, "copies": copies, "us": 1e6 * t, "GB_s": 4 * c * k / t / 1e9}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--mib", type=int, default=256, help="MiB of weights cycled per case (and per STREAM array)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", help="write the measurements here")
    args = ap.parse_args()
    import mixquant

    results = {"simd": mixquant.simd_level(), "stream": [], "matvec": [], "mv": []}
    print(f"STREAM-like, torch float32 arrays of {args.mib} MiB ({_load()})")
    print(f"{'threads':>7} {'copy GB/s':>10} {'triad GB/s':>11}")
    for nt in args.threads:
        r = bench_stream(args.mib, nt, args.repeat)
        results["stream"].append(r)
        print(f"{nt:>7} {r['copy_GB_s']:10.1f} {r['triad_GB_s']:11.1f}")
    triad = {r["threads"]: r["triad_GB_s"] for r in results["stream"]}
    for nt in args.threads:
        print(f"\npacked_matvec ({results['simd']}, per channel) vs torch.mv (float32), 1 vector, {nt} thread(s), "
              f"{args.mib} MiB of weights cycled ({_load()})")
        head = " ".join(f"{f'{b}-bit us':>9} {'GB/s':>5} {'%bw':>4}" for b in args.bits)
        print(f"{'C x K':>11} {head} {'mv us':>8} {'GB/s':>5} {'%bw':>4}  {'4-bit vs mv':>11}")
        for shape in SHAPES:
            cells = []
            for bits in args.bits:
                r = bench_case(shape, bits, nt, args.mib, args.repeat)
                results["matvec"].append(r)
                cells.append(r)
            m = bench_mv(shape, nt, args.mib, args.repeat)
            results["mv"].append(m)
            row = " ".join(f"{r['us']:9.1f} {r['GB_s']:5.1f} {100 * r['GB_s'] / triad[nt]:4.0f}" for r in cells)
            four = next((r for r in cells if r["bits"] == 4), None)
            ratio = f"{m['us'] / four['us']:10.2f}x" if four else ""
            print(f"{shape[0]:>5}x{shape[1]:<5} {row} {m['us']:8.1f} {m['GB_s']:5.1f} "
                  f"{100 * m['GB_s'] / triad[nt]:4.0f}  {ratio:>11}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
