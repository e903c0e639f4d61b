"""The experiment runner: plan the comparisons, quantize, evaluate, record.

Every comparison is made at an equal parameter-weighted average weight
bit-width (the budget rule), or for the QEM rule against the uniform configs of
equal or larger size. The first and last layer (in execution order) are pinned
at 8 bits for everyone in the main studies ("pinned"), as BRECQ does; a second
asymmetric study ("free") lets every layer go, uniform included.

A *level* names a head-to-head point: an integer ``b`` compares uniform ``b``
with MixQuant at exactly uniform ``b``'s average; ``b + 0.5`` puts MixQuant
half-way between the averages of uniform ``b`` and uniform ``b + 1`` (a
non-integer uniform config does not exist) and compares it with both.

Records are plain dicts (see :data:`RECORD_KEYS`), written to JSON.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..io.files import write_text_atomic
from .names import METHODS, SETUP_NAMES
from .setups import SCALES, EvalData, Scale, Setup, build_setup, first_last_layers

__all__ = ["Job", "METHODS", "RECORD_KEYS", "run_experiments", "plan_jobs", "machine_info",
           "load_results", "save_results", "merge_results"]

PIN_BITS = 8

#: Keys of every record (``metrics`` holds ``top1``, ``agree``, ``kl`` and, for
#: ImageNet photos, ``top1_views``).
RECORD_KEYS = (
    "model", "study", "method", "selector", "rule", "level", "uniform_bits", "target_avg_bits", "avg_bits",
    "size_bytes", "objective", "qem", "qem_reference", "per_channel", "pinned", "act_bits", "seed", "metrics",
    "quant_seconds", "eval_seconds", "bits",
)


@dataclass(frozen=True)
class Job:
    """One quantize + evaluate run."""

    model: str
    study: str  # asym | asym_a8 | per_tensor | free | objective | qem | brecq | brecq_act
    method: str  # asymmetric | brecq
    selector: str  # uniform | mixquant
    rule: str  # uniform | budget | qem
    level: Optional[float] = None
    uniform_bits: Optional[int] = None
    objective: Optional[str] = None
    qem: Optional[float] = None
    qem_reference: Optional[str] = None
    per_channel: bool = True
    pinned: bool = True
    act_bits: Optional[int] = None
    seed: int = 0

    def config_key(self) -> Tuple:
        return (self.selector, self.rule, self.level, self.uniform_bits, self.objective, self.qem,
                self.qem_reference, self.per_channel, self.pinned)

    def describe(self) -> str:
        if self.selector == "uniform":
            what = f"uniform {self.uniform_bits}"
        elif self.rule == "qem":
            what = f"MixQuant QEM {self.qem:g} ({self.qem_reference})"
        else:
            what = f"MixQuant level {self.level:g} ({self.objective})"
        gran = "per-channel" if self.per_channel else "per-tensor"
        pins = "first/last 8" if self.pinned else "all free"
        act = f"W/A{self.act_bits}" if self.act_bits else "W only"
        return f"{self.model} {self.method} {what}, {gran}, {pins}, {act}, seed {self.seed}"


# --------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------


def _brackets(level: float) -> List[int]:
    """Uniform bit-widths a level is compared with: itself, or the two integers around it."""
    lo = math.floor(level)
    return [lo] if level == lo else [lo, lo + 1]


def _head_to_head(model: str, study: str, method: str, levels: Iterable[float], *, objective: str = "norm",
                  per_channel: bool = True, pinned: bool = True, act_bits: Optional[int] = None,
                  seeds: Sequence[int] = (0,), uniform_too: bool = True) -> List[Job]:
    jobs: List[Job] = []
    levels = sorted(set(float(v) for v in levels))
    uniforms = sorted({b for v in levels for b in _brackets(v)})
    for seed in seeds:
        if uniform_too:
            for b in uniforms:
                jobs.append(Job(model, study, method, "uniform", "uniform", level=float(b), uniform_bits=b,
                                per_channel=per_channel, pinned=pinned, act_bits=act_bits, seed=seed))
        for v in levels:
            jobs.append(Job(model, study, method, "mixquant", "budget", level=v, objective=objective,
                            per_channel=per_channel, pinned=pinned, act_bits=act_bits, seed=seed))
    return jobs


def plan_jobs(setup: Setup, scale: Scale, methods: Sequence[str], seeds: Sequence[int]) -> List[Job]:
    """Every run of one model, in execution order (cheap ones first)."""
    m = setup.name
    full = scale.full_grid
    seeds = list(seeds)[: scale.max_seeds] if scale.max_seeds else list(seeds)
    jobs: List[Job] = []
    if "asymmetric" in methods:
        if full:
            pareto = set(float(b) for b in setup.pareto_bits) | set(setup.levels)
            pareto |= {b + 0.5 for b in setup.pareto_bits[:-1]}
        else:
            pareto = {float(setup.levels[0]), float(setup.levels[-1])}
        jobs += _head_to_head(m, "asym", "asymmetric", pareto)
        levels = setup.levels if full else setup.levels[:1]
        jobs += _head_to_head(m, "asym_a8", "asymmetric", levels, act_bits=8)
        jobs += _head_to_head(m, "per_tensor", "asymmetric", setup.per_tensor_levels if full else setup.levels[:1],
                              per_channel=False)
        free = setup.free_levels if full else setup.free_levels[:1]
        jobs += _head_to_head(m, "free", "asymmetric", free, pinned=False)
        for objective in ("mse", "sse"):
            jobs += _head_to_head(m, "objective", "asymmetric", levels, objective=objective, uniform_too=False)
            if setup.objective_free:
                jobs += _head_to_head(m, "objective", "asymmetric", free, objective=objective, pinned=False,
                                      uniform_too=False)
        for ref in ("layer", "model"):
            for q in (setup.qem_values if full else setup.qem_values[1:2]):
                jobs.append(Job(m, "qem", "asymmetric", "mixquant", "qem", qem=float(q), qem_reference=ref))
    if "brecq" in methods:
        levels = setup.brecq_levels if full else setup.brecq_levels[:1]
        jobs += _head_to_head(m, "brecq", "brecq", levels, seeds=seeds)
        act_seeds = list(seeds)[: setup.brecq_act_seeds] if setup.brecq_act_seeds else list(seeds)
        jobs += _head_to_head(m, "brecq_act", "brecq", levels, act_bits=setup.brecq_act_bits, seeds=act_seeds)
    return jobs


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------


def machine_info() -> Dict[str, Any]:
    """What ran the experiment: CPU, cores, threads, memory, versions."""
    import mixquant

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal"):
                    mem = round(int(line.split()[1]) / 2**20, 1)
                    break
    except OSError:
        pass
    return {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory_gib": mem,
        "python": platform.python_version(), "torch": torch.__version__, "mixquant": mixquant.__version__,
        "simd": mixquant.simd_level(), "platform": platform.platform(),
    }


class _ModelRun:
    """State shared by the jobs of one model: model, data, FP32 reference, configs."""

    def __init__(self, setup: Setup, scale: Scale, log: Callable[[str], None]) -> None:
        self.setup, self.scale, self.log = setup, scale, log
        self.model = setup.build_model().eval()
        self.data: EvalData = setup.load_eval(scale)
        self.calib_cache: Dict[int, torch.Tensor] = {}
        t0 = time.perf_counter()
        self.fp_logits = self.logits(self.model)
        self.fp_seconds = time.perf_counter() - t0
        self.pins = first_last_layers(self.model, self.data.x[:1])
        self.keep = {name: PIN_BITS for name in self.pins}
        self.configs: Dict[Tuple, Any] = {}

    @torch.no_grad()
    def logits(self, model: nn.Module) -> torch.Tensor:
        model.eval()
        bs = self.setup.batch_size
        return torch.cat([model(self.data.x[i:i + bs]).float() for i in range(0, self.data.x.shape[0], bs)])

    def metrics(self, logits: torch.Tensor) -> Dict[str, float]:
        pred = logits.argmax(1)
        y = self.data.y
        out: Dict[str, float] = {}
        if self.data.center_index is not None:
            c = self.data.center_index
            out["top1"] = (pred[c] == y[c]).float().mean().item()
            out["top1_views"] = (pred == y).float().mean().item()
        else:
            out["top1"] = (pred == y).float().mean().item()
        out["agree"] = (pred == self.fp_logits.argmax(1)).float().mean().item()
        logp = F.log_softmax(self.fp_logits, 1)
        logq = F.log_softmax(logits, 1)
        out["kl"] = (logp.exp() * (logp - logq)).sum(1).clamp_min(0).mean().item()
        return out

    def calib(self, seed: int) -> torch.Tensor:
        if seed not in self.calib_cache:
            self.calib_cache[seed] = self.setup.load_calib(self.scale, seed)
        return self.calib_cache[seed]

    def uniform_avg(self, bits: int, per_channel: bool, pinned: bool) -> float:
        import mixquant

        return mixquant.uniform(self.model, bits, per_channel=per_channel, keep=self.keep if pinned else None,
                                errors=False).avg_bits

    def target_avg(self, job: Job) -> Optional[float]:
        if job.rule != "budget":
            return None
        avgs = [self.uniform_avg(b, job.per_channel, job.pinned) for b in _brackets(job.level)]
        return sum(avgs) / len(avgs)

    def config(self, job: Job):
        import mixquant

        key = job.config_key()
        if key not in self.configs:
            keep = self.keep if job.pinned else None
            if job.selector == "uniform":
                cfg = mixquant.uniform(self.model, job.uniform_bits, per_channel=job.per_channel, keep=keep)
            elif job.rule == "qem":
                cfg = mixquant.search(self.model, self.setup.candidates, qem=job.qem, qem_reference=job.qem_reference,
                                      per_channel=job.per_channel, keep=keep)
            else:
                cfg = mixquant.search(self.model, self.setup.candidates, avg_bits=self.target_avg(job),
                                      objective=job.objective, per_channel=job.per_channel, keep=keep)
            self.configs[key] = cfg
        return self.configs[key]

    def brecq_options(self) -> Dict[str, Any]:
        opts = dict(self.setup.brecq_options)
        if self.scale.brecq_scale != 1.0:
            for k in ("iters", "act_iters"):
                if k in opts:
                    opts[k] = max(2, int(round(opts[k] * self.scale.brecq_scale)))
        if self.scale.brecq_samples is not None:
            opts["num_samples"] = self.scale.brecq_samples
            opts["batch_size"] = min(int(opts.get("batch_size", 32)), self.scale.brecq_samples)
        return opts

    def run(self, job: Job) -> Dict[str, Any]:
        import mixquant

        cfg = self.config(job)
        kwargs: Dict[str, Any] = {"progress": False, "seed": job.seed}
        if job.method == "brecq":
            kwargs.update(self.brecq_options())
            kwargs["calib_data"] = self.calib(job.seed)
        elif job.act_bits is not None:
            kwargs["calib_data"] = self.calib(job.seed)
        if job.act_bits is not None:
            kwargs["act_bits"] = job.act_bits
        t0 = time.perf_counter()
        qmodel = mixquant.quantize(self.model, cfg, job.method, **kwargs)
        t1 = time.perf_counter()
        metrics = self.metrics(self.logits(qmodel))
        t2 = time.perf_counter()
        applied = qmodel.mixquant_state.config
        if applied.bits != cfg.bits:
            raise RuntimeError(f"{job.describe()}: quantize changed the bit config ({cfg.bits} -> {applied.bits})")
        return {
            "model": job.model, "study": job.study, "method": job.method, "selector": job.selector,
            "rule": job.rule, "level": job.level, "uniform_bits": job.uniform_bits,
            "target_avg_bits": self.target_avg(job), "avg_bits": cfg.avg_bits, "size_bytes": cfg.size_bytes,
            "objective": job.objective, "qem": job.qem, "qem_reference": job.qem_reference,
            "per_channel": job.per_channel, "pinned": job.pinned, "act_bits": job.act_bits, "seed": job.seed,
            "metrics": metrics, "quant_seconds": round(t1 - t0, 3), "eval_seconds": round(t2 - t1, 3),
            "bits": dict(cfg.bits) if job.selector == "mixquant" else None,
        }

    def model_info(self) -> Dict[str, Any]:
        import mixquant

        layers = mixquant.find_layers(self.model)
        table = mixquant.search(self.model, range(1, 9), avg_bits=8.0, per_channel=True)  # error table 1..8 bits
        table_pt = mixquant.search(self.model, range(1, 9), avg_bits=8.0, per_channel=False)
        fp = self.metrics(self.fp_logits)
        s = self.setup
        return {
            "title": s.title, "calib": s.calib_description, "eval": s.eval_description,
            "eval_data": self.data.description, "num_eval": int(self.data.x.shape[0]),
            "pinned_layers": list(self.pins), "candidates": list(s.candidates),
            "layers": [{"name": n, "params": int(m.weight.numel()), "shape": list(m.weight.shape)}
                       for n, m in layers.items()],
            "fp32": fp, "fp32_eval_seconds": round(self.fp_seconds, 3),
            "errors_per_channel": {n: {"bits": e["bits"], "norm": e["norm"], "mse": e["mse"], "sse": e["sse"]}
                                   for n, e in table.errors.items()},
            "errors_per_tensor": {n: {"bits": e["bits"], "norm": e["norm"]} for n, e in table_pt.errors.items()},
            "brecq_options": self.brecq_options(), "brecq_act_bits": s.brecq_act_bits,
            "levels": list(s.levels), "primary": s.primary,
            "uniform_avg_bits": {
                "pinned": {b: self.uniform_avg(b, True, True) for b in range(1, 9)},
                "free": {b: float(b) for b in range(1, 9)},
            },
        }


def _seed_list(seeds: Any) -> List[int]:
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out:
        raise ValueError("seeds is empty")
    return out


def run_experiments(
    models: Optional[Sequence[str]] = None,
    methods: Optional[Sequence[str]] = None,
    seeds: Any = 3,
    scale: str = "default",
    out: Optional[str] = None,
    log: Optional[Callable[[str], None]] = None,
    command: str = "",
    threads: Optional[int] = None,
) -> Dict[str, Any]:
    """Run the experiment grid and return the results dict (``meta``, ``models``, ``records``).

    ``models``: names from :data:`SETUP_NAMES` (default all); ``methods``:
    "asymmetric" (also runs the QEM sweep, the objective study, per-tensor and
    "all layers free") and/or "brecq"; ``seeds``: a count or a list (they enter
    BRECQ's batch sampling and the calibration draw); ``scale``: "quick" or
    "default". With ``out``, the results are written there (JSON) after every
    model, so an interrupted run keeps what it finished. ``threads``: torch CPU
    threads for the run (restored afterwards); on a machine shared with other
    jobs, 1 avoids the large slow-downs of oversubscribed OpenMP threads.
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        torch.set_num_threads(threads)
    try:
        return _run(models, methods, seeds, scale, out, log, command)
    finally:
        torch.set_num_threads(previous_threads)


def _run(models, methods, seeds, scale, out, log, command) -> Dict[str, Any]:
    models = list(models or SETUP_NAMES)
    methods = list(methods or METHODS)
    for m in models:
        if m not in SETUP_NAMES:
            raise ValueError(f"unknown model {m!r}; choose from {', '.join(SETUP_NAMES)}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
    sc = SCALES[scale]
    seed_list = _seed_list(seeds)
    log = log or (lambda msg: print(msg, flush=True))
    started = time.time()
    results: Dict[str, Any] = {
        "meta": {
            "command": command, "scale": scale, "models": models, "methods": methods, "seeds": seed_list,
            "started": _dt.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(),
            "seconds": None, "seconds_per_model": {}, "finished": False,
        },
        "models": {},
        "records": [],
    }
    for name in models:
        t_model = time.perf_counter()
        setup = build_setup(name, sc)
        log(f"== {name}: loading model and data")
        run = _ModelRun(setup, sc, log)
        results["models"][name] = run.model_info()
        fp = results["models"][name]["fp32"]
        log("   FP32: " + ", ".join(f"{k} {v:.4f}" for k, v in fp.items()) + f"; first/last layers {run.pins}")
        jobs = plan_jobs(setup, sc, methods, seed_list)
        for i, job in enumerate(jobs, 1):
            rec = run.run(job)
            results["records"].append(rec)
            mt = rec["metrics"]
            log(f"   [{i}/{len(jobs)}] {job.describe()}: avg {rec['avg_bits']:.3f} bits, top1 {mt['top1']:.4f}, "
                f"agree {mt['agree']:.4f}, KL {mt['kl']:.4f} ({rec['quant_seconds']:.1f}+{rec['eval_seconds']:.1f} s)")
        results["meta"]["seconds_per_model"][name] = round(time.perf_counter() - t_model, 1)
        results["meta"]["seconds"] = round(time.time() - started, 1)
        if out:
            save_results(results, out)
    results["meta"]["seconds"] = round(time.time() - started, 1)
    results["meta"]["finished"] = True
    if out:
        save_results(results, out)
    return results


def save_results(results: Dict[str, Any], path: str) -> None:
    """Write ``results`` as JSON (atomically, replacing an older version of the same file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text_atomic(path, json.dumps(results, indent=1, default=_json_default) + "\n", overwrite=True)


def load_results(path: str) -> Dict[str, Any]:
    with open(path) as fh:
        return json.load(fh)


def merge_results(parts: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One results dict from several runs (e.g. models run as separate processes).

    Models and records are concatenated (a model may appear in one part only); the
    meta keeps every part's command, start time and run time; ``seconds`` is the sum
    of the parts' run times (the compute spent, even where parts ran side by side).
    """
    if not parts:
        raise ValueError("nothing to merge")
    if len(parts) == 1:
        return parts[0]
    merged: Dict[str, Any] = {"meta": dict(parts[0]["meta"]), "models": {}, "records": []}
    meta = merged["meta"]
    meta["parts"] = [{k: p["meta"].get(k) for k in ("command", "started", "seconds", "models", "finished")}
                     for p in parts]
    meta["command"] = " ; ".join(p["meta"].get("command") or "" for p in parts)
    meta["models"] = [m for p in parts for m in p["meta"]["models"] if m in p["models"]]
    meta["seconds"] = round(sum(p["meta"].get("seconds") or 0 for p in parts), 1)
    meta["seconds_per_model"] = {}
    for p in parts:
        for name, info in p["models"].items():
            if name in merged["models"]:
                raise ValueError(f"model {name!r} appears in two of the merged results")
            merged["models"][name] = info
            merged["records"] += [r for r in p["records"] if r["model"] == name]
            if name in p["meta"].get("seconds_per_model", {}):
                meta["seconds_per_model"][name] = p["meta"]["seconds_per_model"][name]
    # a part saved after each finished model: the merge is complete when every model in it finished
    meta["finished"] = all(name in meta["seconds_per_model"] for name in merged["models"])
    return merged


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
