"""One rank of a test job (started by tests/_dist.py): ``python _dist_worker.py SCENARIO ARGS...``.

Scenarios write what they found to ``OUT/rank<r>.json`` and exit 0; an error
is printed to stderr as ``worker error: <type>: <message>`` with exit status 2.
A planted failure (``--fail die|hang|raise --at NAME``) happens on rank 1 when
it reaches layer NAME of the checkpoint search, or (``brecq``) its NAME-th sum
of gradients over the ranks.
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


def brecq(args: argparse.Namespace) -> dict:
    """BRECQ on a tiny ResNet (``--options``: BrecqOptions as JSON, plus ``act_bits``) with the samples split
    between the ranks: every quantized weight, activation step size and report record."""
    from _quant_models import images, tiny_resnet

    options = json.loads(args.options)
    options = options[0] if isinstance(options, list) else options
    act_bits = options.pop("act_bits", None)
    if args.fail != "none":
        _plant_in_reconstruction(args.fail, int(args.at))
    if args.nudge_on is not None and launch.init().rank == args.nudge_on:
        _nudge_optimisers()
    model = tiny_resnet(seed=0)
    config = mixquant.uniform(model, 3)
    calib = images(int(options.get("num_samples", 24)), size=8, seed=1)
    qmodel = mixquant.quantize(model, config, "brecq", calib_data=calib, act_bits=act_bits, seed=3, progress=False,
                               distributed=True, **options)
    state = qmodel.state_dict()
    weights = {k: v.flatten().tolist() for k, v in state.items() if k.endswith(".weight")}
    scales = {k: float(v) for k, v in state.items() if k.endswith(".scale") and v.dim() == 0}
    records = [{k: v for k, v in vars(r).items() if k not in ("seconds", "median_iter_s")}
               for r in qmodel.mixquant_report.records]
    return {"weights": weights, "act_scales": scales, "records": records}


def _nudge_optimisers() -> None:
    """Twice the learning rate on this rank (AdaRound's fused step and the step sizes' Adam): ranks whose
    updates differ, as they would (by far less) where kernels round differently on another CPU."""
    import torch

    from mixquant.methods import adaround

    step = adaround.rounding_step

    def nudged(state, grad, *, lr, **kw):
        return step(state, grad, lr=lr * 2, **kw)

    class Adam(torch.optim.Adam):
        def __init__(self, params, lr=1e-3, **kw):
            super().__init__(params, lr=lr * 2, **kw)

    adaround.rounding_step = nudged
    torch.optim.Adam = Adam


def _plant_in_reconstruction(fail: str, at: int) -> None:
    """Rank 1 dies (or hangs) at its ``at``-th gradient sum of the reconstruction."""
    from mixquant.methods.data_parallel import Shard

    summed = Shard.summed
    calls = {"n": 0}

    def wrapped(self, *a, **kw):
        calls["n"] += 1
        if self.workers.rank == 1 and calls["n"] == at:
            if fail == "die":
                os._exit(17)
            if fail == "hang":
                os.kill(os.getpid(), signal.SIGSTOP)
            if fail == "raise":
                raise ValueError(f"planted failure at gradient sum {at}")
        return summed(self, *a, **kw)

    Shard.summed = wrapped


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="scenario", required=True)
    p = sub.add_parser("search")
    p.add_argument("path")
    p.add_argument("out")
    p.add_argument("--options", default="[{}]")
    p.add_argument("--fail", choices=["none", "die", "hang", "raise"], default="none")
    p.add_argument("--at", default="")
    p = sub.add_parser("brecq")
    p.add_argument("out")
    p.add_argument("--options", default="{}")
    p.add_argument("--fail", choices=["none", "die", "hang", "raise"], default="none")
    p.add_argument("--at", default="0")
    p.add_argument("--nudge-on", type=int, default=None, help="the rank whose updates are nudged")
    args = parser.parse_args()
    try:
        found = {"search": search, "brecq": brecq}[args.scenario](args)
    except Exception as exc:  # noqa: BLE001 - the test reads the type and message
        print(f"worker error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    w = launch.init()
    with open(os.path.join(args.out, f"rank{w.rank}.json"), "w") as fh:
        json.dump({**found, "rank": w.rank, "world_size": w.world_size}, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
