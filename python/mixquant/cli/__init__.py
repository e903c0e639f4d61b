"""Command-line interface: ``mixquant <command> ...`` (see ``mixquant --help``)."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# Each module registers one sub-command through its ``register(subparsers)``.
_COMMAND_MODULES = ["search_cmd", "quantize_cmd", "evaluate_cmd", "demo_cmd", "experiment_cmd"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixquant",
        description="MixQuant: choose a weight bit-width for every layer of a PyTorch model from its "
        "roundoff error, then quantize the model.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"mixquant {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``mixquant`` console script; returns the exit status."""
    parser = build_parser()
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
