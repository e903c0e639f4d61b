"""How mixquant's main jobs behave when the CPU is shared: idle, then with one busy process per core.

Each workload runs in a fresh child process, first with the machine as it is
("idle", which on a shared host is not idle: the load average is printed
next to every figure), then again while one CPU-bound competitor per core
(a pure-Python busy loop) runs. For each run the child's wall, user and
system time come from ``os.wait4``; the table gives

* ``wall x``: loaded wall / idle wall (goal: at most 2.5),
* ``cpu x``: loaded (user + system) / idle (user + system) (goal: at most 1.3),
* ``sys %``: system time / user time when idle (goal: under 10 %);
* ``RSS MB``: the child's peak resident memory (the heap keeps freed blocks).

Workloads (``--workloads``, comma-separated):

* ``search``: ``mixquant.search`` of MobileNetV2 (budget rule, 2..8 bits), repeated;
* ``brecq``: BRECQ's reconstruction of one MobileNetV2 inverted-residual
  block (``--brecq-unit``, default ``features.2``, the demo's slowest) with the
  demo's preset (batch 8, 32 calibration crops, one thread);
* ``demo``: the whole ``mixquant demo`` (``--demo-quick`` for its test-sized run).

Every child first sets up its process the way the ``mixquant`` command does
(:func:`mixquant.prepare_process`: OpenMP's passive wait, malloc thresholds).
The ``untuned`` variant (``MIXQUANT_PROCESS_TUNING=0``) runs the workloads
named by ``--untuned`` (default ``search,brecq``) again without it, to show
what the set-up fixes. ``--variant NAME=ENV`` adds runs with other
environment variables (``;`` separates several, e.g.
``--variant t1=OMP_NUM_THREADS=1``). ``--threads`` sets
``MIXQUANT_NUM_THREADS``/``--threads`` of the children and the BRECQ unit's torch threads
(default: their default; the BRECQ unit uses the demo's preset, one thread).

One command, prints a table (and ``--json FILE`` writes the records)::

    python benchmarks/bench_contention.py                      # search, brecq, demo (+ untuned search, brecq)
    python benchmarks/bench_contention.py --workloads search,brecq --repeat 3
    python benchmarks/bench_contention.py --workloads demo --untuned demo   # the demo before/after (long)

Needs the offline data (``bash scripts/install_data.sh``) for MobileNetV2 and the photos.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

WORKLOADS = ("search", "brecq", "demo")
GOALS = {"wall": 2.5, "cpu": 1.3, "sys": 0.10}


# --------------------------------------------------------------------------- workloads (run in the child)


def _work_search(args: argparse.Namespace) -> None:
    import mixquant
    from mixquant import zoo

    model = zoo.mobilenet_v2().eval()
    for _ in range(args.search_repeat):
        mixquant.search(model, range(2, 9), avg_bits=4.0)


def _work_brecq(args: argparse.Namespace) -> None:
    import torch

    import mixquant
    from mixquant import zoo
    from mixquant.experiments.demo import DemoSettings, calibration_crops
    from mixquant.methods.blocks import Unit
    from mixquant.methods.brecq import BrecqOptions, _gather, reconstruct_unit
    from mixquant.methods.common import QuantJob
    from mixquant.nn.fold import fold_bn_pairs

    settings = DemoSettings()
    model = zoo.mobilenet_v2().eval()
    calib = calibration_crops(settings.calib, settings.size, seed=0)
    config = mixquant.uniform(model, 4, errors=False)
    fold_bn_pairs(model)
    for p in model.parameters():
        p.requires_grad_(False)
    fp_model = __import__("copy").deepcopy(model)
    name = args.brecq_unit
    unit = Unit(name, model.get_submodule(name), "block",
                [n for n in config.bits if n.startswith(name + ".")])
    opts = BrecqOptions(iters=args.brecq_iters, batch_size=settings.brecq["batch_size"],
                        num_samples=settings.brecq["num_samples"])
    threads = args.threads or settings.brecq.get("num_threads")
    if threads:
        torch.set_num_threads(threads)  # as quantize_brecq does with the demo's preset
    job = QuantJob(bits=dict(config.bits), spec=config.spec, act_bits=None, order=list(config.bits),
                   calib_x=calib, calib_y=None, progress=False)
    data = _gather(unit, model, fp_model, calib, None, opts, torch.device("cpu"))
    reconstruct_unit(unit, data, model, job, opts, torch.Generator().manual_seed(0), False)


def _work_demo(args: argparse.Namespace) -> None:
    from mixquant.cli import main

    with tempfile.TemporaryDirectory(prefix="mixquant-bench-") as out:
        argv = ["demo", "--out", os.path.join(out, "report")] + (["--quick"] if args.demo_quick else [])
        if args.threads:
            argv += ["--threads", str(args.threads)]
        rc = main(argv)
    if rc:
        raise SystemExit(rc)


# --------------------------------------------------------------------------- the parent


def _load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _child(workload: str, args: argparse.Namespace, env: Dict[str, str]) -> Dict[str, float]:
    """Run one workload in a fresh interpreter; its wall, user and system seconds."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", workload,
           "--search-repeat", str(args.search_repeat), "--brecq-iters", str(args.brecq_iters),
           "--brecq-unit", args.brecq_unit]
    if args.demo_quick:
        cmd.append("--demo-quick")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    load = _load()
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: progress bars must never block the child
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL if not args.verbose else None,
                                stderr=None if args.verbose else log)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        log.seek(0)
        err = log.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"workload {workload!r} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall": wall, "user": usage.ru_utime, "sys": usage.ru_stime, "load": load,
            "ctx_invol": usage.ru_nivcsw, "ctx_vol": usage.ru_nvcsw, "minflt": usage.ru_minflt,
            "max_rss_mb": usage.ru_maxrss / 1024}


def _competitors(n: int) -> List[subprocess.Popen]:
    busy = "while True:\n    pass\n"
    return [subprocess.Popen([sys.executable, "-c", busy]) for _ in range(n)]


def _median_run(workload: str, args: argparse.Namespace, env: Dict[str, str]) -> Dict[str, float]:
    runs = [_child(workload, args, env) for _ in range(args.repeat)]
    best = sorted(runs, key=lambda r: r["wall"])[len(runs) // 2]
    best = dict(best)
    best["walls"] = [round(r["wall"], 2) for r in runs]
    return best


def measure(workload: str, args: argparse.Namespace, env: Dict[str, str]) -> Dict[str, object]:
    idle = _median_run(workload, args, env)
    rivals = _competitors(_cores())
    try:
        time.sleep(0.5)  # let them reach full speed
        loaded = _median_run(workload, args, env)
    finally:
        for p in rivals:
            p.kill()
        for p in rivals:
            p.wait()
    cpu_i, cpu_l = idle["user"] + idle["sys"], loaded["user"] + loaded["sys"]
    return {
        "idle": idle, "loaded": loaded,
        "wall_ratio": loaded["wall"] / idle["wall"],
        "cpu_ratio": cpu_l / cpu_i if cpu_i > 0 else float("nan"),
        "sys_share": idle["sys"] / idle["user"] if idle["user"] > 0 else float("nan"),
    }


def _table(records: List[Dict[str, object]]) -> str:
    head = ("workload", "variant", "idle wall", "idle user", "idle sys", "load", "busy wall", "busy user",
            "busy sys", "load", "wall x", "cpu x", "sys %", "RSS MB", "goals")
    rows = [head]
    for r in records:
        i, b = r["idle"], r["loaded"]
        ok = (r["wall_ratio"] <= GOALS["wall"], r["cpu_ratio"] <= GOALS["cpu"], r["sys_share"] < GOALS["sys"])
        rows.append((r["workload"], r["variant"], f"{i['wall']:.1f}", f"{i['user']:.1f}", f"{i['sys']:.1f}",
                     i["load"], f"{b['wall']:.1f}", f"{b['user']:.1f}", f"{b['sys']:.1f}", b["load"],
                     f"{r['wall_ratio']:.2f}", f"{r['cpu_ratio']:.2f}", f"{100 * r['sys_share']:.1f}",
                     f"{max(i['max_rss_mb'], b['max_rss_mb']):.0f}",
                     "ok" if all(ok) else "MISSED " + ",".join(k for k, good in zip(("wall", "cpu", "sys"), ok)
                                                              if not good)))
    widths = [max(len(str(row[c])) for row in rows) for c in range(len(head))]
    lines = ["  ".join(str(c).rjust(w) if k >= 2 else str(c).ljust(w) for k, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _variant(text: str) -> tuple:
    name, sep, assignments = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--variant takes NAME=VAR=VALUE[;VAR=VALUE], got {text!r}")
    env = {}
    for item in assignments.split(";"):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--variant {text!r}: {item!r} is not VAR=VALUE")
        env[key] = value
    return name, env


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated, from {','.join(WORKLOADS)} (default all)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell; the median-wall run is reported (default 1)")
    ap.add_argument("--search-repeat", type=int, default=20, help="searches per 'search' run (default 20)")
    ap.add_argument("--brecq-iters", type=int, default=200, help="AdaRound iterations of the 'brecq' unit (default 200)")
    ap.add_argument("--brecq-unit", default="features.2",
                    help="the MobileNetV2 block the 'brecq' workload reconstructs (default features.2, 112x112 input)")
    ap.add_argument("--demo-quick", action="store_true", help="run 'mixquant demo --quick' instead of the full demo")
    ap.add_argument("--threads", type=int, default=0, help="threads of the children (default 0: their default)")
    ap.add_argument("--untuned", default="search,brecq",
                    help="workloads also run without the process set-up (default search,brecq; '' for none)")
    ap.add_argument("--variant", type=_variant, action="append", default=[],
                    help="also run with these environment variables: NAME=VAR=VALUE[;VAR=VALUE] (repeatable)")
    ap.add_argument("--json", help="write the records to this JSON file")
    ap.add_argument("--verbose", action="store_true", help="show the children's output")
    ap.add_argument("--worker", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        from mixquant.core.runtime import prepare_process

        prepare_process()  # what the mixquant command does first (a no-op with MIXQUANT_PROCESS_TUNING=0)
        {"search": _work_search, "brecq": _work_brecq, "demo": _work_demo}[args.worker](args)
        return 0
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad or args.repeat < 1:
        ap.error(f"unknown workload {bad[0]!r}" if bad else "--repeat must be >= 1")
    import platform

    print(f"{_cores()} cores, {platform.processor() or platform.machine()}, python {platform.python_version()}; "
          f"load average at start {_load()}", flush=True)
    untuned = {w.strip() for w in args.untuned.split(",") if w.strip()}
    records = []
    for workload in workloads:
        variants = [("tuned", {})] + ([("untuned", {"MIXQUANT_PROCESS_TUNING": "0"})] if workload in untuned else [])
        for name, extra in variants + list(args.variant):
            env = dict(os.environ, **extra)
            if args.threads:
                env["MIXQUANT_NUM_THREADS"] = str(args.threads)
            rec = measure(workload, args, env)
            rec.update(workload=workload, variant=name, env=extra)
            records.append(rec)
            print(f"  {workload}/{name}: idle {rec['idle']['wall']:.1f} s, busy {rec['loaded']['wall']:.1f} s",
                  flush=True)
    print(_table(records))
    print(f"goals: wall x <= {GOALS['wall']}, cpu x <= {GOALS['cpu']}, sys % < {100 * GOALS['sys']:.0f}; "
          f"load average at end {_load()} (1/5/15 min)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"records": records, "median": statistics.median(r["wall_ratio"] for r in records)}, fh,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
