"""Speed and memory of the search straight from a safetensors checkpoint.

Writes a synthetic checkpoint in LLaMA-like shapes (default: TinyLlama-1.1B's,
hidden 2048, MLP 5632, 22 layers, grouped-query k/v of 256, vocabulary 32000,
untied head: 1.10e9 bfloat16 weights, 2.2 GB) as shards plus
``model.safetensors.index.json`` into a temporary folder, then, each in a
fresh process so that its peak RSS is its own:

* ``import``: Python, torch and mixquant alone (the floor of every RSS below);
* ``read``: every layer read run by run and converted to float32, no table
  (what the reading costs);
* ``channel`` and ``g128``: the whole ``mixquant.search_checkpoint`` (7
  bit-widths, 2..8, ``avg_bits=4``), per channel and with groups of 128.

In this process it also times the native table (G weights/s) on the runs of
rows the search reads from the checkpoint and on whole in-memory float32
tensors of the same shapes (one transformer layer plus the embedding),
alternately, best of 3: "at least as fast" allows 5 % for timing noise. The
folder is deleted at the end (``--keep`` keeps it).

    python benchmarks/bench_checkpoint.py [--threads 2] [--layers 22] [--dir /tmp] [--json out.json]

Targets: a whole search under 15 s with the file in the page cache; peak RSS
under the largest tensor's float32 size + 300 MB; the table at least as fast
per weight as on in-memory tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import torch


BITS = list(range(2, 9))
CHILD = r"""
import json, sys, time, torch
torch.set_num_threads({threads})
import mixquant
from mixquant.api.checkpoint import ROWS_ELEMS, checkpoint_layers, layer_runs
from mixquant.io.checkpoint import list_tensors
mode, path = {mode!r}, {path!r}
t0 = time.perf_counter()
if mode == "read":  # what the search reads and converts, without the tables
    buf = torch.empty(ROWS_ELEMS)
    for name, info in checkpoint_layers(list_tensors(path)).items():
        for m, _ in layer_runs(info, 0, True, buf, name, num_threads={threads}):
            pass
elif mode != "import":
    cfg = mixquant.search_checkpoint(path, {bits}, avg_bits=4.0, group_size={gs}, num_threads={threads})
    assert len(cfg.bits) > 0
seconds = time.perf_counter() - t0
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec.
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({{"seconds": seconds, "peak_rss": hwm * 1024}}))
"""


def llama_shapes(layers: int, hidden: int, mlp: int, kv: int, vocab: int) -> List[Tuple[str, Tuple[int, int]]]:
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (kv, hidden)),
                   (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "mlp.gate_proj.weight", (mlp, hidden)), (p + "mlp.up_proj.weight", (mlp, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, mlp)),
                   (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def write_checkpoint(folder: str, shapes, shard_bytes: int) -> int:
    """Shards of at most ``shard_bytes`` bfloat16 bytes (one tensor in memory at a time per shard) and the index."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    shards: List[List[Tuple[str, Tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        n = 2 * torch.Size(shape).numel()
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            t = torch.randn(shape, generator=g) * 0.02
            if len(shape) == 2:
                t[:, :: max(1, shape[1] // 7)] *= 8  # a few outlier columns, as in real LLMs
            tensors[name] = t.to(torch.bfloat16)
            weight_map[name] = fname
        save_file(tensors, os.path.join(folder, fname))
        total += os.path.getsize(os.path.join(folder, fname))
        del tensors
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    return total


def read_all(folder: str) -> float:
    """Seconds to read every shard once (puts the files in the page cache)."""
    t0 = time.perf_counter()
    for f in sorted(os.listdir(folder)):
        with open(os.path.join(folder, f), "rb", buffering=0) as fh:
            while fh.read(16 * 2**20):
                pass
    return time.perf_counter() - t0


def child(mode: str, folder: str, threads: int, gs) -> Dict[str, float]:
    code = CHILD.format(threads=threads, mode=mode, path=folder, bits=BITS, gs=gs)
    env = dict(os.environ, MIXQUANT_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"{mode} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table_rates(folder: str, shapes, threads: int, gs) -> Tuple[float, float]:
    """G weights/s of the native table (a) on the runs of rows the checkpoint search reads and (b) on whole
    float32 tensors in memory, for one transformer layer plus the embedding, timed alternately (best of 3)."""
    from mixquant.api.checkpoint import ROWS_ELEMS, checkpoint_layers, layer_runs
    from mixquant.core.error import row_table, spec_roundoff_error
    from mixquant.core.spec import QuantizerSpec
    from mixquant.io.checkpoint import list_tensors, read_tensor

    spec = QuantizerSpec(group_size=gs)
    layers = {n: t for n, t in checkpoint_layers(list_tensors(folder)).items() if ".layers.0." in n or "embed" in n}
    in_memory = [read_tensor(t).float() for t in layers.values()]
    buf = torch.empty(ROWS_ELEMS)
    n = sum(t.numel for t in layers.values())
    best_runs = best_mem = float("inf")
    for _ in range(3):
        spent = 0.0
        for name, info in layers.items():
            for m, _ in layer_runs(info, 0, True, buf, name, num_threads=threads):
                t0 = time.perf_counter()
                row_table(m, BITS, spec, "native", threads, name)
                spent += time.perf_counter() - t0
        best_runs = min(best_runs, spent)
        t0 = time.perf_counter()
        for t in in_memory:
            spec_roundoff_error(t, BITS, spec, num_threads=threads)
        best_mem = min(best_mem, time.perf_counter() - t0)
    return n / best_runs / 1e9, n / best_mem / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=22, help="transformer layers (22: 1.1e9 weights)")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary checkpoint folder goes")
    ap.add_argument("--shard-mb", type=int, default=300)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint folder")
    ap.add_argument("--json", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = llama_shapes(args.layers, 2048, 5632, 256, 32000)
    n_weights = sum(torch.Size(s).numel() for n, s in shapes if len(s) >= 2)
    largest_f32 = max(4 * torch.Size(s).numel() for _, s in shapes)
    folder = tempfile.mkdtemp(prefix="mixquant-ckpt-", dir=args.dir)
    rows = []
    try:
        t0 = time.perf_counter()
        file_bytes = write_checkpoint(folder, shapes, args.shard_mb * 2**20)
        print(f"wrote {file_bytes / 1e9:.2f} GB ({n_weights / 1e9:.3f} G weights) to {folder} "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
        warm = read_all(folder)
        print(f"page-cache read of the files: {file_bytes / warm / 1e9:.2f} GB/s", flush=True)
        base = child("import", folder, args.threads, None)
        runs = {"read": child("read", folder, args.threads, None),
                "channel": child("search", folder, args.threads, None),
                "g128": child("search", folder, args.threads, 128)}
        rate = {"channel": table_rates(folder, shapes, args.threads, None), "g128": table_rates(folder, shapes, args.threads, 128)}
        budget = largest_f32 + 300 * 2**20
        print(f"\n{args.threads} threads; import alone: peak RSS {base['peak_rss'] / 2**20:.0f} MiB; largest tensor "
              f"in float32 {largest_f32 / 2**20:.0f} MiB (RSS target {budget / 2**20:.0f} MiB)")
        head = f"{'run':8} {'seconds':>8} {'GB/s read':>10} {'G w/s':>7} {'table: runs':>12} {'in-memory':>10} " \
               f"{'peak RSS MiB':>13}  targets"
        print(head + "\n" + "-" * len(head))
        for name, r in runs.items():
            table = mem = None
            checks = [f"RSS {'ok' if r['peak_rss'] < budget else 'MISS'}"]
            if name != "read":
                table, mem = rate[name]
                checks += [f"<15 s {'ok' if r['seconds'] < 15 else 'MISS'}",
                           f"table {'ok' if table >= 0.95 * mem else 'MISS'}"]
            print(f"{name:8} {r['seconds']:8.2f} {file_bytes / r['seconds'] / 1e9:10.2f} "
                  f"{n_weights / r['seconds'] / 1e9:7.3f} {'' if table is None else f'{table:.3f}':>12} "
                  f"{'' if mem is None else f'{mem:.3f}':>10} {r['peak_rss'] / 2**20:13.0f}  {', '.join(checks)}")
            rows.append({"run": name, **r, "table_gw_s": table, "in_memory_gw_s": mem})
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"threads": args.threads, "weights": n_weights, "file_bytes": file_bytes,
                           "largest_f32_bytes": largest_f32, "import_peak_rss": base["peak_rss"],
                           "page_cache_read_s": warm, "runs": rows, "load": os.getloadavg()}, fh, indent=1)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
