"""The sensitivity study: uniform bits against the data-free rule and every data-aware sensitivity.

For each model, every sensitivity is measured once (:func:`mixquant.api.search.measure`),
then the budget rule picks the bits at each level (:func:`~mixquant.api.search.choose`)
and each config is quantized (vanilla asymmetric; BRECQ for the CNNs) and evaluated
on held-apart data. A level ``b`` compares with uniform ``b`` at the same parameter-weighted
average; ``b + 0.5`` sits half-way between uniform ``b`` and ``b + 1`` and is compared
with the straight line between them.

Models: the CNNs of :mod:`.setups` (first and last layer pinned at 8 bits for
everyone, as in the main study), the all-mpnet-base-v2 sentence encoder
(primary metric: cosine of its embeddings to the float model's on held-apart
sentences; also WordSim353 Spearman and Pang-Lee polarity accuracy) and the
SmolLM2-135M causal LM (primary: perplexity on held-apart text). For the
transformers every Linear layer of the blocks is free; the embeddings (and
SmolLM2's output head, tied to them) and MPNet's unused pooler stay in float.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..io.files import read_regular, write_text_atomic

__all__ = ["STUDY_MODELS", "SELECTORS", "run_sensitivity_study", "render_sensitivity_report"]

STUDY_MODELS = ("mobilenet_v2", "resnet20", "mnist_ccexam", "mnist_digit", "mpnet", "smollm2")
DATA_SELECTORS = ("input", "output", "fisher", "model")
SELECTORS = ("uniform", "weight") + DATA_SELECTORS


@dataclass
class StudyModel:
    """A model of the study: what to quantize, with what data, and how to score the result."""

    name: str
    title: str
    model: nn.Module
    calib: Any  # calibration data for the search (and BRECQ for the CNNs)
    evaluate: Callable[[nn.Module], Dict[str, float]]
    primary: str
    higher_is_better: bool
    levels: List[float]
    candidates: List[int]
    keep: Dict[str, int] = field(default_factory=dict)
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None
    output_loss: str = "kl"
    brecq: Optional[Dict[str, Any]] = None
    brecq_calib: Optional[torch.Tensor] = None
    calib_description: str = ""
    eval_description: str = ""
    fp32: Dict[str, float] = field(default_factory=dict)


def _cnn(name: str, quick: bool, log: Callable[[str], None]) -> StudyModel:
    from .runner import _ModelRun
    from .setups import SCALES, build_setup

    scale = SCALES["quick" if quick else "default"]
    setup = build_setup(name, scale)
    run = _ModelRun(setup, scale, log)
    calib = run.calib(0)
    samples = {"mobilenet_v2": 64}.get(name, 256) if not quick else 16
    levels = {"mobilenet_v2": [3, 4, 5], "resnet20": [2.5, 3, 4]}.get(name, [2.5, 3])
    sm = StudyModel(
        name=name, title=setup.title, model=run.model, calib=calib[:samples],
        evaluate=lambda q: run.metrics(run.logits(q)), primary=setup.primary, higher_is_better=True,
        levels=levels[:1] if quick else levels, candidates=list(setup.candidates), keep=dict(run.keep),
        brecq=run.brecq_options(), brecq_calib=calib,
        calib_description=f"{samples} of: {setup.calib_description}", eval_description=run.data.description,
    )
    sm.fp32 = run.metrics(run.fp_logits)
    return sm


def _batches(tokenized: Dict[str, torch.Tensor], size: int) -> List[Dict[str, torch.Tensor]]:
    n = tokenized["input_ids"].shape[0]
    return [{k: v[i:i + size] for k, v in tokenized.items()} for i in range(0, n, size)]


def _mpnet(quick: bool, log: Callable[[str], None]) -> StudyModel:
    from .. import zoo
    from ..zoo import text

    encoder, tok = zoo.mpnet_encoder()
    n_calib = 8 if quick else 32
    sentences = text.calibration_sentences(n_calib)
    calib = text.tokenize(tok, sentences, max_length=128)  # one padded batch: one pass per candidate
    eval_texts = [t for t, _ in text.pang_lee_polarity()] + text.lee_documents("test")
    if quick:
        eval_texts = eval_texts[:24]
    reference = text.embed(encoder, tok, eval_texts)
    polarity_n = len(text.pang_lee_polarity())

    def evaluate(q: nn.Module) -> Dict[str, float]:
        emb = text.embed(q, tok, eval_texts)
        out = {"cosine": float(torch.nn.functional.cosine_similarity(emb, reference, dim=1).mean())}
        if not quick:
            out["wordsim"] = text.wordsim_spearman(q, tok)
            out["polarity"] = _polarity_from(emb[:polarity_n])
        return out

    sm = StudyModel(
        name="mpnet", title="all-mpnet-base-v2 sentence encoder (109 M parameters)", model=encoder, calib=calib,
        evaluate=evaluate, primary="cosine", higher_is_better=True, levels=[3] if quick else [3, 3.5, 4, 5],
        candidates=[2, 3, 4, 5, 6, 8], filter_fn=lambda m, n: not n.startswith("model.pooler"),
        output_loss="cosine",
        calib_description=f"{n_calib} sentences drawn from gensim's lee_background.cor (300 ABC news documents)",
        eval_description=f"embedding cosine to FP32 on {len(eval_texts)} held-apart texts (the Pang-Lee sentences "
        "and the 50 lee.cor documents); WordSim353 Spearman; Pang-Lee nearest-centroid accuracy (10-fold)",
    )
    sm.fp32 = {"cosine": 1.0, **({} if quick else {"wordsim": text.wordsim_spearman(encoder, tok),
                                                   "polarity": _polarity_from(reference[:polarity_n])})}
    return sm


def _polarity_from(emb: torch.Tensor, folds: int = 10) -> float:
    from ..zoo import text

    labels = torch.tensor([y for _, y in text.pang_lee_polarity()])
    correct = 0
    for f in range(folds):
        test = torch.arange(len(labels)) % folds == f
        centroids = torch.stack([emb[~test & (labels == c)].mean(0) for c in (0, 1)])
        pred = (emb[test] @ torch.nn.functional.normalize(centroids, dim=1).t()).argmax(1)
        correct += int((pred == labels[test]).sum())
    return correct / len(labels)


def _smollm2(quick: bool, log: Callable[[str], None]) -> StudyModel:
    from .. import zoo
    from ..zoo import text

    lm, tok = zoo.smollm2()
    windows = text.token_windows(tok, text.lee_documents("background"), 128)
    g = torch.Generator().manual_seed(0)
    calib = windows[torch.randperm(windows.shape[0], generator=g)[: 2 if quick else 4]]
    evaluation = text.token_windows(tok, text.lee_documents("test"), 512)
    if quick:
        evaluation = evaluation[:1, :64]

    def evaluate(q: nn.Module) -> Dict[str, float]:
        return {"perplexity": text.perplexity(q, evaluation)}

    sm = StudyModel(
        name="smollm2", title="SmolLM2-135M-Instruct causal LM (weights de-quantized from GGUF Q4_1)", model=lm,
        calib=calib, evaluate=evaluate, primary="perplexity", higher_is_better=False,
        levels=[3] if quick else [3, 3.5, 4, 5], candidates=[2, 3, 4, 5, 6, 8],
        filter_fn=lambda m, n: n != "model.lm_head", output_loss="kl",
        calib_description=f"{calib.shape[0]} windows of 128 tokens drawn from gensim's lee_background.cor",
        eval_description=f"perplexity on {evaluation.shape[0]} windows of {evaluation.shape[1]} tokens of "
        "gensim's lee.cor (50 other news documents)",
    )
    sm.fp32 = evaluate(lm)
    return sm


def build_study_model(name: str, quick: bool = False, log: Callable[[str], None] = print) -> StudyModel:
    if name == "mpnet":
        return _mpnet(quick, log)
    if name == "smollm2":
        return _smollm2(quick, log)
    if name in STUDY_MODELS:
        return _cnn(name, quick, log)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(STUDY_MODELS)}")


def _brackets(level: float) -> List[int]:
    lo = math.floor(level)
    return [lo] if level == lo else [lo, lo + 1]


def run_sensitivity_study(
    models: Sequence[str] = STUDY_MODELS,
    methods: Sequence[str] = ("asymmetric", "brecq"),
    selectors: Sequence[str] = SELECTORS,
    *,
    quick: bool = False,
    out: Optional[str] = None,
    log: Callable[[str], None] = lambda m: print(m, flush=True),
) -> Dict[str, Any]:
    """Run the study; with ``out``, results are written there after every cell (a rerun resumes)."""
    import mixquant
    from mixquant.api.search import choose, measure

    results: Dict[str, Any] = {"models": {}, "records": [], "measurements": {}}
    if out and os.path.exists(out):  # resume: the cells already done are kept
        results = json.loads(read_regular(out, 2**30, "study results").decode("utf-8"))
    done = {(r["model"], r["method"], r["selector"], r["level"]) for r in results["records"]}

    def save() -> None:
        if out:
            write_text_atomic(out, json.dumps(results, indent=1) + "\n", overwrite=True)

    for name in models:
        t_model = time.perf_counter()
        log(f"== {name}: loading model and data")
        sm = build_study_model(name, quick, log)
        layers = mixquant.find_layers(sm.model, sm.filter_fn)
        n_params = {n: m.weight.numel() for n, m in layers.items()}
        total = sum(n_params.values())
        results["models"][name] = {
            "title": sm.title, "primary": sm.primary, "higher_is_better": sm.higher_is_better, "fp32": sm.fp32,
            "levels": sm.levels, "candidates": sm.candidates, "layers": len(layers), "params": total,
            "pinned": sm.keep, "calib": sm.calib_description, "eval": sm.eval_description,
        }
        log(f"   {len(layers)} layers, {total} weights; FP32 {sm.fp32}")
        meas = {}
        for sel in [s for s in selectors if s != "uniform"]:
            t0 = time.perf_counter()
            meas[sel] = measure(sm.model, sm.candidates, keep=sm.keep, filter_fn=sm.filter_fn, sensitivity=sel,
                                calib_data=None if sel == "weight" else sm.calib, output_loss=sm.output_loss)
            secs = time.perf_counter() - t0
            results["measurements"].setdefault(name, {})[sel] = {
                "seconds": round(secs, 2), "stages": {k: round(v, 2) for k, v in meas[sel].seconds.items()},
                "samples": (meas[sel].calibration or {}).get("samples")}
            log(f"   measured {sel}: {secs:.1f} s")
        save()
        uniform_avg = {b: mixquant.uniform(sm.model, b, keep=sm.keep, filter_fn=sm.filter_fn, errors=False).avg_bits
                       for b in sorted({b for lv in sm.levels for b in _brackets(lv)})}
        for method in methods:
            if method == "brecq" and sm.brecq is None:
                continue
            cells = []
            for b in uniform_avg if "uniform" in selectors else ():
                cells.append(("uniform", float(b), mixquant.uniform(sm.model, b, keep=sm.keep, filter_fn=sm.filter_fn)))
            for level in sm.levels:
                target = sum(uniform_avg[b] for b in _brackets(level)) / len(_brackets(level))
                for sel in meas:
                    cells.append((sel, float(level), choose(meas[sel], avg_bits=target)))
            for sel, level, cfg in cells:
                if (name, method, sel, level) in done:
                    continue
                t0 = time.perf_counter()
                kwargs: Dict[str, Any] = {"progress": False}
                if method == "brecq":
                    kwargs.update(sm.brecq)
                    kwargs["calib_data"] = sm.brecq_calib
                q = mixquant.quantize(sm.model, cfg, method, **kwargs)
                t1 = time.perf_counter()
                metrics = sm.evaluate(q)
                rec = {"model": name, "method": method, "selector": sel, "level": level, "avg_bits": cfg.avg_bits,
                       "size_bytes": cfg.size_bytes, "metrics": metrics, "quant_seconds": round(t1 - t0, 2),
                       "eval_seconds": round(time.perf_counter() - t1, 2), "bits": dict(cfg.bits)}
                results["records"].append(rec)
                save()
                log(f"   {method} {sel} level {level:g}: avg {cfg.avg_bits:.3f}, "
                    + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                del q
        results["models"][name]["seconds"] = round(time.perf_counter() - t_model, 1)
        save()
    return results


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def _value(results: Dict[str, Any], model: str, method: str, selector: str, level: float) -> Optional[float]:
    info = results["models"][model]
    recs = [r for r in results["records"] if (r["model"], r["method"], r["selector"]) == (model, method, selector)]
    if selector == "uniform":
        by_bits = {r["level"]: r for r in recs}
        br = _brackets(level)
        if not all(float(b) in by_bits for b in br):
            return None
        if len(br) == 1:
            return by_bits[float(br[0])]["metrics"][info["primary"]]
        a, b = by_bits[float(br[0])], by_bits[float(br[1])]
        mid = (a["avg_bits"] + b["avg_bits"]) / 2
        t = (mid - a["avg_bits"]) / (b["avg_bits"] - a["avg_bits"])
        return a["metrics"][info["primary"]] * (1 - t) + b["metrics"][info["primary"]] * t
    for r in recs:
        if r["level"] == level:
            return r["metrics"][info["primary"]]
    return None


def verdict(results: Dict[str, Any], default: str) -> Dict[str, Any]:
    """Cells where ``default`` is worse than uniform, and its mean margin over uniform and the data-free rule."""
    worse, vs_uniform, vs_weight = [], [], []
    for model, info in results["models"].items():
        sign = 1.0 if info["higher_is_better"] else -1.0
        for method in ("asymmetric", "brecq"):
            for level in info["levels"]:
                d, u, w = (_value(results, model, method, s, level) for s in (default, "uniform", "weight"))
                if d is None or u is None:
                    continue
                margin = sign * (d - u)
                vs_uniform.append(margin / max(abs(u), 1e-12))
                if margin < 0:
                    worse.append((model, method, level, d, u))
                if w is not None:
                    vs_weight.append(sign * (d - w) / max(abs(w), 1e-12))
    return {"worse_than_uniform": worse, "cells": len(vs_uniform),
            "mean_rel_gain_vs_uniform": sum(vs_uniform) / len(vs_uniform) if vs_uniform else None,
            "mean_rel_gain_vs_weight": sum(vs_weight) / len(vs_weight) if vs_weight else None}


def _fmt(v: Optional[float], metric: str) -> str:
    if v is None:
        return "-"
    if metric in ("top1", "agree", "top1_views", "polarity"):
        return f"{100 * v:.1f}"
    if metric == "perplexity":
        return f"{v:.2f}"
    return f"{v:.4f}"


def render_sensitivity_report(results: Dict[str, Any], default: str, command: str = "") -> str:
    """The markdown section of docs/RESULTS.md for this study."""
    lines = ["## Data-aware sensitivities", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [
        "Each selector picks per-layer bits with the exact budget rule at the same parameter-weighted average as "
        "uniform bits (`b.5`: half-way between uniform `b` and `b+1`, compared with the straight line between "
        "them). `weight` is the data-free table (the paper's method, objective `norm`); the others are measured "
        "on the calibration data. Bold: the best selector of the row.",
        "",
    ]
    for model, info in results["models"].items():
        metric = info["primary"]
        better = max if info["higher_is_better"] else min
        lines += [f"### {info['title']}", "",
                  f"{info['layers']} quantized layers, {info['params']:,} weights; pinned at 8 bits: "
                  f"{', '.join(info['pinned']) or 'none'}. Calibration: {info['calib']}. Evaluation: {info['eval']}. "
                  f"Primary metric: {metric} ({'higher' if info['higher_is_better'] else 'lower'} is better; "
                  f"FP32 {_fmt(info['fp32'].get(metric), metric)}).", ""]
        sels = [s for s in SELECTORS if any(r["selector"] == s and r["model"] == model for r in results["records"])]
        for method in ("asymmetric", "brecq"):
            if not any(r["model"] == model and r["method"] == method for r in results["records"]):
                continue
            lines += [f"{method}, {metric}:", "", "| level | " + " | ".join(sels) + " |",
                      "|---|" + "---|" * len(sels)]
            for level in info["levels"]:
                vals = {s: _value(results, model, method, s, level) for s in sels}
                known = [v for v in vals.values() if v is not None]
                best = better(known) if known else None
                cells = [(f"**{_fmt(v, metric)}**" if v is not None and v == best else _fmt(v, metric)) for v in vals.values()]
                lines.append(f"| {level:g} | " + " | ".join(cells) + " |")
            lines.append("")
        extra = [m for m in ("wordsim", "polarity") if m in info["fp32"]]
        if extra:
            for m in extra:
                lines += [f"asymmetric, {m} (FP32 {_fmt(info['fp32'][m], m)}):", "",
                          "| level | " + " | ".join(sels) + " |", "|---|" + "---|" * len(sels)]
                for level in info["levels"]:
                    row = []
                    for s in sels:
                        old = info["primary"]
                        info["primary"] = m
                        row.append(_fmt(_value(results, model, "asymmetric", s, level), m))
                        info["primary"] = old
                    lines.append(f"| {level:g} | " + " | ".join(row) + " |")
                lines.append("")
        cost = results.get("measurements", {}).get(model, {})
        if cost:
            lines += ["Cost of measuring each sensitivity (seconds, statistics and all candidates): "
                      + ", ".join(f"{s} {c['seconds']:.1f}" for s, c in cost.items()) + ".", ""]
    v = verdict(results, default)
    lines += [f"Default data-aware sensitivity `{default}`: worse than uniform in {len(v['worse_than_uniform'])} of "
              f"{v['cells']} cells"
              + (" (" + "; ".join(f"{m} {me} {lv:g}: {d:.4g} vs {u:.4g}" for m, me, lv, d, u in v['worse_than_uniform'])
                 + ")" if v["worse_than_uniform"] else "")
              + (f"; mean relative gain over uniform {100 * v['mean_rel_gain_vs_uniform']:+.2f} %"
                 if v["mean_rel_gain_vs_uniform"] is not None else "")
              + (f", over the data-free rule {100 * v['mean_rel_gain_vs_weight']:+.2f} %."
                 if v["mean_rel_gain_vs_weight"] is not None else "."), ""]
    return "\n".join(lines)
