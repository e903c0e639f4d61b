"""Stress test (not CI): a tensor with more than 2**31 elements through the native core.

Default: a [2, 2**30 + 3] float32 tensor (2**31 + 6 elements, 8.6 GB), with its
extreme values planted beyond flat index 2**31 so that any 32-bit index
arithmetic would miss them.  For each operation it reports the time and the
peak RSS of the process next to the tensor's size, and compares the result with
the same computation done in chunks of columns (each chunk far below 2**31
elements, with the same quantization parameters):

* roundoff_error per channel and per tensor (7 bit-widths): scales and zero
  points equal, max |e| equal, sums of squared error within 1e-6 relative;
* clip_search per tensor (small grid): the chosen ratio equal, Lp error within 1e-6;
* quantize to uint8 codes: equal chunk by chunk; pack_bits at 3 bits
  (6.4e9 bits, beyond 2**32) and unpack_bits back: equal.

    python benchmarks/stress_large.py [--cols N] [--threads T] [--skip-elementwise]

Needs about 1.6x the tensor size in RAM with the elementwise part, 1.05x without.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time

import numpy as np
import torch

import mixquant
from mixquant.io.files import write_text_atomic
from mixquant import _core
from mixquant.core import reference

BITS = list(range(2, 9))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux


def chunks(cols: int, size: int):
    for a in range(0, cols, size):
        yield a, min(cols, a + size)


def make_tensor(rows: int, cols: int, seed: int, chunk: int) -> torch.Tensor:
    w = torch.empty(rows, cols)
    g = torch.Generator().manual_seed(seed)
    for a, b in chunks(cols, chunk):
        w[:, a:b].normal_(generator=g)
    # Extremes beyond flat index 2**31 (row 1 starts at 2**30 + 3): the global max,
    # the global min, and a tiny value next to them in the same channel.
    w[1, cols - 2] = 40.0
    w[1, cols - 5] = -33.0
    w[1, cols - 9] = 1e-30
    w[0, cols - 1] = 25.0   # channel 0's max, at its very end
    return w


def chunked_minmax(w: torch.Tensor, chunk: int):
    lo = torch.full((w.shape[0],), float("inf"))
    hi = torch.full((w.shape[0],), float("-inf"))
    for a, b in chunks(w.shape[1], chunk):
        mn, mx = torch.aminmax(w[:, a:b], dim=1)
        lo, hi = torch.minimum(lo, mn), torch.maximum(hi, mx)
    return lo, hi


def chunked_table(w: torch.Tensor, scale: np.ndarray, zp: np.ndarray, bits, chunk: int, nt: int):
    sse = np.zeros((len(bits), w.shape[0]))
    mx = np.zeros((len(bits), w.shape[0]), np.float32)
    for a, b in chunks(w.shape[1], chunk):
        part = np.ascontiguousarray(w[:, a:b].numpy())
        s, m = _core.error_table(part, scale, zp.astype(np.int64), np.asarray(bits, np.int32), nt)
        sse += s
        mx = np.maximum(mx, m)
    return sse, mx


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--cols", type=int, default=2**30 + 3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=1 << 26, help="columns per chunk of the reference computation")
    ap.add_argument("--skip-elementwise", action="store_true", help="skip quantize/pack (needs +0.6x the tensor)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    nt, chunk = args.threads, args.chunk
    torch.set_num_threads(nt)
    records = {}
    failures = []

    def step(label, fn):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        records[label] = {"seconds": round(dt, 2), "peak_rss_gb": round(peak_rss_gb(), 2)}
        print(f"  {label:<34} {dt:8.1f} s   peak RSS {peak_rss_gb():6.2f} GB", flush=True)
        return out

    def expect(ok: bool, what: str):
        print(f"    {'ok ' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            failures.append(what)

    base = peak_rss_gb()
    w = step("allocate + fill", lambda: make_tensor(args.rows, args.cols, 0, chunk))
    n = w.numel()
    tensor_gb = n * 4 / 1e9
    print(f"mixquant {mixquant.__version__} ({mixquant.simd_level()}, {nt} threads): tensor {tuple(w.shape)}, "
          f"{n} elements ({n / 2**31:.6f} x 2**31), {tensor_gb:.2f} GB; RSS before {base:.2f} GB", flush=True)
    records["tensor"] = {"shape": list(w.shape), "numel": n, "gb": round(tensor_gb, 3), "rss_before_gb": round(base, 2)}

    # -- error table per channel and per tensor
    lo, hi = step("chunked min/max (torch)", lambda: chunked_minmax(w, chunk))
    for per_channel in (True, False):
        label = "per_channel" if per_channel else "per_tensor"
        r = step(f"roundoff_error {label}", lambda: mixquant.roundoff_error(
            w, BITS, per_channel=per_channel, backend="native", num_threads=nt))
        l, h = (lo, hi) if per_channel else (lo.min().reshape(1), hi.max().reshape(1))
        ref_s = np.stack([reference.qparams(l, h, b, False)[0].numpy() for b in BITS])
        ref_z = np.stack([reference.qparams(l, h, b, False)[1].numpy() for b in BITS])
        expect(np.array_equal(r.scale, ref_s) and np.array_equal(r.zero_point, ref_z),
               f"{label}: scales/zero points equal the chunked min/max ones (max 40 and min -33 sit beyond 2**31)")
        sse, mx = step(f"chunked error table {label}", lambda: chunked_table(w, r.scale, r.zero_point, BITS, chunk, nt))
        d = rel(r.channel_sse, sse)
        expect(d <= 1e-6, f"{label}: sse vs chunked, max relative difference {d:.2e} (<= 1e-6)")
        expect(np.array_equal(r.channel_max_abs, mx), f"{label}: max |e| equal to the chunked one")
        records[f"error_table_{label}"] = {"sse": r.sse.tolist(), "chunked_sse": sse.sum(axis=1).tolist(),
                                           "max_rel_diff": d}

    # -- clipping search, per tensor (one group of 2**31 + 6 elements)
    grid, step_ = 4, 0.05
    c = step("clip_search per_tensor (4 ratios x 2 bits)", lambda: mixquant.clip_search(
        w, [3, 4], per_channel=False, n_grid=grid, step=step_, backend="native", num_threads=nt))
    l, h = lo.min().reshape(1), hi.max().reshape(1)
    best_err = []
    for bi, b in enumerate([3, 4]):
        errs = []
        for i in range(grid):
            f = 1.0 - i * step_
            s, z = reference.qparams((l.double() * f).float(), (h.double() * f).float(), b, False)
            sse, _ = chunked_table(w, s.numpy().reshape(1, 1), z.numpy().reshape(1, 1), [b], chunk, nt)
            errs.append(sse.sum())
        best = int(np.argmin(errs))
        expect(int(c.best_index[bi, 0]) == best, f"clip {b} bits: chosen ratio {int(c.best_index[bi, 0])} == chunked {best}")
        d = rel(c.lp_err[bi, 0].item(), errs[int(c.best_index[bi, 0])])
        expect(d <= 1e-6, f"clip {b} bits: Lp error vs chunked, relative difference {d:.2e}")
        best_err.append(float(c.lp_err[bi, 0]))
    records["clip_search_per_tensor"] = {"lp_err": best_err}

    # -- elementwise: codes, packing beyond 2**32 bits
    if not args.skip_elementwise:
        s, z = mixquant.choose_qparams(w, 3, per_channel=True, num_threads=nt)
        q = step("quantize_tensor (uint8 codes)", lambda: mixquant.quantize_tensor(w, s, z, 3, num_threads=nt))
        same = True
        for a, b in chunks(args.cols, chunk):
            part = w[:, a:b].contiguous()
            same &= torch.equal(q[:, a:b], mixquant.quantize_tensor(part, s, z, 3, num_threads=nt))
        expect(same, "quantize: codes equal chunk by chunk")
        flat = q.reshape(-1)
        packed = step("pack_bits at 3 bits", lambda: mixquant.pack_bits(flat, 3))
        expect(len(packed) == (n * 3 + 7) // 8, f"pack: {len(packed)} bytes for {n * 3} bits ({'beyond' if n * 3 > 2**32 else 'below'} 2**32)")
        del q
        gc.collect()
        back = step("unpack_bits", lambda: mixquant.unpack_bits(packed, 3, n))
        expect(np.array_equal(back, flat.numpy()), "unpack(pack(codes)) == codes")
        tail = slice(n - 1000, n)
        expect(np.array_equal(back[tail], flat.numpy()[tail]), "last 1000 codes (beyond 2**31) round-trip")
        del back, packed, flat
        gc.collect()

    peak = peak_rss_gb()
    records["peak_rss_gb"] = round(peak, 2)
    records["peak_over_tensor"] = round(peak / tensor_gb, 3)
    print(f"peak RSS {peak:.2f} GB = {peak / tensor_gb:.2f} x the tensor ({tensor_gb:.2f} GB)")
    if args.json:
        write_text_atomic(args.json, json.dumps(records, indent=1), overwrite=True)
    if failures:
        print(f"FAILED: {failures}", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
