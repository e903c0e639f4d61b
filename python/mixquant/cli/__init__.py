"""Command-line interface: ``mixquant <command> ...`` (see ``mixquant --help``).

Only the command being run is imported (``mixquant --help`` imports none of
them, nor torch), and :func:`mixquant.prepare_process` runs before anything
loads torch, so OpenMP's threads wait passively on a shared machine.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Dict, List, Optional, Sequence, Tuple

# Command -> (module registering it with ``register(subparsers)``, one-line help).
COMMANDS: Dict[str, Tuple[str, str]] = {
    "search": ("search_cmd", "choose a weight bit-width per layer (the MixQuant search)"),
    "quantize": ("quantize_cmd",
                 "quantize a model with a bit config (vanilla asymmetric or BRECQ) and save it with packed weights"),
    "evaluate": ("evaluate_cmd",
                 "evaluate a quantized model file: accuracy, and top-1 agreement / KL against the float model"),
    "demo": ("demo_cmd",
             "end-to-end demo on MobileNetV2 and real photos: search, quantize, evaluate, write a report"),
    "experiment": ("experiment_cmd",
                   "run the MixQuant-vs-uniform experiments on real models and write the results report"),
}


def _command_in(argv: Sequence[str]) -> Optional[str]:
    """The command named in ``argv`` (the first word that is not an option), if it is one."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The ``mixquant`` parser; only the command named in ``argv`` gets its full set of options."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="mixquant",
        description="MixQuant: choose a weight bit-width for every layer of a PyTorch model from its "
        "roundoff error, then quantize the model.",
        epilog="`mixquant COMMAND --help` explains a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"mixquant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = _command_in(sys.argv[1:] if argv is None else argv)
    for name, (module, help_line) in COMMANDS.items():
        if name == wanted:
            importlib.import_module(f"{__name__}.{module}").register(sub)
        else:  # listed in `mixquant --help`; its options are read only when it runs
            sub.add_parser(name, help=help_line, add_help=False)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``mixquant`` console script; returns the exit status."""
    from ..core.runtime import prepare_process

    prepare_process()  # before torch is imported: OpenMP reads its wait policy once
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    from ..parallel.workers import RankFailure  # imports nothing heavy

    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError, ImportError, RankFailure) as exc:  # OSError: missing, unwritable, ...
        from .ranks import where

        print(f"mixquant {args.command}{where()}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from .ranks import where

        print(f"mixquant {args.command}{where()}: interrupted", file=sys.stderr)
        return 130
