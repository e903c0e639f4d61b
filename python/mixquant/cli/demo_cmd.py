"""``mixquant demo``: search → quantize → evaluate → report on MobileNetV2 and the offline photos."""

from __future__ import annotations

import argparse


from ..experiments.names import DEMO_OUT as DEFAULT_OUT
from . import COMMANDS
from .common import set_threads


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help=COMMANDS["demo"][1],
        description="Run the whole pipeline on MobileNetV2 (torchvision's ImageNet weights): the MixQuant "
        "search at an average weight bit-width, vanilla asymmetric and BRECQ quantization next to the uniform "
        "bit-width of the same average, evaluation on foolbox's labelled ImageNet photos (calibration on other "
        "photos), a printed table and a report folder (markdown, JSON, PNG plots). A few minutes on 2 cores. "
        "Needs the offline data (bash scripts/install_data.sh) and matplotlib.",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"report folder (default ./{DEFAULT_OUT})")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    p.add_argument("--quick", action="store_true", help="a few images and iterations (seconds; used by the tests)")
    p.add_argument("--avg-bits", type=float, default=None, help="average weight bits of MixQuant (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration crops and BRECQ (default 0)")
    p.add_argument("--no-brecq", action="store_true", help="skip BRECQ (vanilla asymmetric only)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..experiments.demo import run_demo

    set_threads(args.threads)
    run_demo(args.out, overwrite=args.overwrite, quick=args.quick, avg_bits=args.avg_bits, seed=args.seed,
             brecq=not args.no_brecq, progress=not args.quick)
    return 0
