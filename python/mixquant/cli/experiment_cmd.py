"""``mixquant experiment``: MixQuant against uniform bit-widths on the offline model zoo; writes the results report."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import List


def _names(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _seeds(text: str):
    try:
        if "," in text:
            return [int(t) for t in text.split(",") if t.strip()]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes a count (3) or a list (0,1,2), got {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    from ..experiments.names import METHODS, SETUP_NAMES
    from . import COMMANDS

    p = sub.add_parser(
        "experiment",
        help=COMMANDS["experiment"][1],
        description="Compare MixQuant's per-layer bit-widths with uniform bit-widths at the same average weight "
        "bit-width, with vanilla asymmetric quantization (plus the QEM sweep, the budget objective study, "
        "per-tensor and all-layers-free variants) and with BRECQ, on MobileNetV2 (ImageNet photos), ResNet-20 "
        "(Fashion-MNIST) and two MNIST CNNs. Writes RESULTS.md, results.json and PNG plots under --out. "
        "Needs the offline data (bash scripts/install_data.sh) and matplotlib (pip install 'mixquant[report]').",
    )
    p.add_argument("--models", type=_names, default=None,
                   help=f"comma-separated models (default all: {','.join(SETUP_NAMES)}; the sensitivity study also "
                   "knows mpnet and smollm2)")
    p.add_argument("--methods", type=_names, default=list(METHODS),
                   help="comma-separated methods: asymmetric (also the QEM sweep, objective study, per-tensor and "
                   "all-layers-free runs), brecq (default both)")
    p.add_argument("--seeds", type=_seeds, default=3, help="number of seeds (3) or a list (0,1,2); default 3")
    p.add_argument("--quick", action="store_true",
                   help="every study once on small data with one seed and BRECQ without iterations: about a minute "
                   "of CPU for the four models (for tests; the numbers mean nothing)")
    p.add_argument("--out", default="mixquant-experiments",
                   help="folder for RESULTS.md, results.json and img/ (default ./mixquant-experiments)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a machine shared with other jobs more threads can be "
                   "much slower; raise it on an idle machine)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--study", choices=["main", "sensitivity"], default="main",
                   help="main: the MixQuant-vs-uniform grid above; sensitivity: uniform vs the data-free rule vs every "
                   "data-aware sensitivity on the CNNs and the two transformers (MPNet, SmolLM2; they need "
                   "'scripts/install_data.sh --transformers'); writes sensitivity.json and sensitivity.md under --out")
    p.add_argument("--report-only", metavar="RESULTS_JSON", nargs="+",
                   help="do not run anything: rebuild the report and plots from existing results.json file(s); "
                   "several files (runs of different models) are merged")
    p.set_defaults(func=run)


def _run_sensitivity(args: argparse.Namespace) -> int:
    import torch

    from ..allocation.sensitivity import DEFAULT_DATA_SENSITIVITY
    from ..experiments.sensitivity_study import STUDY_MODELS, render_sensitivity_report, run_sensitivity_study
    from ..io.files import check_destination, write_text_atomic

    models = list(args.models) if args.models is not None else list(STUDY_MODELS)
    unknown = [m for m in models if m not in STUDY_MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)} for the sensitivity study; choose from "
                         f"{', '.join(STUDY_MODELS)}")
    data = os.path.join(args.out, "sensitivity.json")
    report = os.path.join(args.out, "sensitivity.md")
    os.makedirs(args.out, exist_ok=True)
    check_destination(report, args.overwrite)
    torch.set_num_threads(args.threads)
    command = "mixquant " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
    results = run_sensitivity_study(models, args.methods, quick=args.quick, out=data)
    write_text_atomic(report, render_sensitivity_report(results, DEFAULT_DATA_SENSITIVITY, command) + "\n",
                      overwrite=args.overwrite)
    print(f"wrote {report} and {data}")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..experiments import SETUP_NAMES, load_results, run_experiments

    if args.study == "sensitivity":
        return _run_sensitivity(args)
    from ..experiments.report import write_report
    from ..io.files import check_destination

    report = os.path.join(args.out, "RESULTS.md")
    data = os.path.join(args.out, "results.json")
    if os.path.lexists(args.out) and not os.path.isdir(args.out):
        raise FileExistsError(f"--out {args.out!r} exists and is not a folder")
    if not os.path.lexists(args.out):
        check_destination(args.out)  # its parent folder exists and is writable
    if args.report_only:
        from ..experiments.runner import merge_results

        results = merge_results([load_results(p) for p in args.report_only])
        same = any(os.path.abspath(p) == os.path.abspath(data) for p in args.report_only)
        if not args.overwrite and (os.path.exists(report) or (os.path.exists(data) and not same)):
            raise FileExistsError(f"{args.out!r} already holds a report; pass --overwrite to replace it")
        for path in (report, data):
            if os.path.lexists(path):
                check_destination(path, overwrite=True)  # a regular file or symlink, replaced atomically
    else:
        for path in (report, data):
            if os.path.lexists(path):
                if not args.overwrite:
                    raise FileExistsError(f"{path!r} exists; pass --overwrite to replace it, or choose another --out")
                check_destination(path, overwrite=True)
        if not args.no_plots:
            from ..experiments.plots import require_matplotlib

            require_matplotlib()  # fail before the run, not after it
        command = "mixquant " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "mixquant experiment"
        partial = os.path.join(args.out, "results.partial.json")
        results = run_experiments(args.models or list(SETUP_NAMES), args.methods, args.seeds, "quick" if args.quick else "default",
                                  out=partial, command=command, threads=args.threads)
    written = write_report(results, args.out, plots=not args.no_plots)
    if not args.report_only:
        try:
            os.remove(os.path.join(args.out, "results.partial.json"))
        except OSError:
            pass
    print(f"wrote {written['report']} and {written['json']}"
          + (f" and {sum(len(v) for v in written['plots'].values())} plots" if written["plots"] else ""))
    return 0
