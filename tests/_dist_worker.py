"""One rank of a test job (started by tests/_dist.py): ``python _dist_worker.py SCENARIO ARGS...``.

Scenarios write what they found to ``OUT/rank<r>.json`` and exit 0; an error
is printed to stderr as ``worker error: <type>: <message>`` with exit status 2.
A planted failure (``--fail die|hang|raise --at NAME``) happens on rank 1 when
it reaches layer NAME of the checkpoint search.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import mixquant
from mixquant.api import checkpoint as ckpt
from mixquant.parallel import launch


_TABLES = ckpt._tables


def _plant(fail: str, at: str, measured: list) -> None:
    tables = _TABLES

    def wrapped(name, *args, **kwargs):
        measured.append(name)
        if launch.init().rank == 1 and name == at:
            if fail == "die":
                os._exit(17)
            if fail == "hang":
                os.kill(os.getpid(), signal.SIGSTOP)
            if fail == "raise":
                raise ValueError(f"planted failure at layer {name!r}")
        return tables(name, *args, **kwargs)

    ckpt._tables = wrapped


def search(args: argparse.Namespace) -> dict:
    """One split search per option set of ``--options`` (a JSON list): the configs and the layers measured."""
    runs = []
    for options in json.loads(args.options):
        measured: list = []
        _plant(args.fail, args.at, measured)
        config = mixquant.search_checkpoint(args.path, distributed=True, **options)
        runs.append({"config": config.to_dict(), "measured": measured})
    return {"runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="scenario", required=True)
    p = sub.add_parser("search")
    p.add_argument("path")
    p.add_argument("out")
    p.add_argument("--options", default="[{}]")
    p.add_argument("--fail", choices=["none", "die", "hang", "raise"], default="none")
    p.add_argument("--at", default="")
    args = parser.parse_args()
    try:
        found = {"search": search}[args.scenario](args)
    except Exception as exc:  # noqa: BLE001 - the test reads the type and message
        print(f"worker error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    w = launch.init()
    with open(os.path.join(args.out, f"rank{w.rank}.json"), "w") as fh:
        json.dump({**found, "rank": w.rank, "world_size": w.world_size}, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
