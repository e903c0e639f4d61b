"""``mixquant search``: find per-layer bit-widths and write them as a bit config."""

from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional, Tuple

from . import COMMANDS
from .common import MODEL_HELP, add_model_options, load_cli_model


def parse_bits(text: str) -> List[int]:
    """'2-8' -> [2..8]; '2,4,8' -> [2, 4, 8]."""
    try:
        if "-" in text:
            lo, hi = (int(t) for t in text.split("-", 1))
            values = list(range(lo, hi + 1))
        else:
            values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must look like '2-8' or '2,3,4,8', got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"bits {text!r} names no bit-width")
    return values


def parse_keep(items: Optional[List[str]]) -> Dict[str, int]:
    """Repeated ``--keep NAME=BITS`` values (each may also list several, comma-separated) -> {name: bits}."""
    keep: Dict[str, int] = {}
    for item in [part for value in items or [] for part in value.split(",") if part.strip()]:
        name, sep, bits = item.strip().rpartition("=")
        if not sep or not name:
            raise ValueError(f"--keep expects NAME=BITS, got {item!r}")
        try:
            keep[name] = int(bits)
        except ValueError:
            raise ValueError(f"--keep {item!r}: BITS must be an int") from None
    return keep


def parse_shape(text: str) -> Tuple[int, ...]:
    """'3,224,224' -> (3, 224, 224): one input's shape, without the batch dimension."""
    try:
        shape = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape must look like 3,224,224, got {text!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"--input-shape must be positive sizes like 3,224,224, got {text!r}")
    return shape


def first_last_keep(model, bits: int, shape: Optional[Tuple[int, ...]]) -> Dict[str, int]:
    """--keep-first-last: the first and last layer in execution order, found on a random input of ``shape``."""
    if shape is None:
        raise ValueError("--keep-first-last needs --input-shape (one input's shape, e.g. 3,224,224): the model "
                         "runs once on it to find its first and last layer in execution order")
    import torch

    from ..api.search import keep_first_last

    example = torch.randn((1,) + tuple(shape), generator=torch.Generator().manual_seed(0))
    try:
        return keep_first_last(model, example, bits)
    except RuntimeError as exc:  # the model's own forward refused the input
        raise ValueError(f"the model does not run on an input of shape {(1,) + tuple(shape)} "
                         f"(--input-shape): {str(exc).splitlines()[0]}") from None


def register(sub: argparse._SubParsersAction) -> None:
    from ..core.limits import DEFAULT_OBJECTIVE, OBJECTIVES

    p = sub.add_parser(
        "search",
        help=COMMANDS["search"][1],
        description="Measure every layer's roundoff error at each candidate bit-width and choose "
        "per-layer bits by the QEM rule (--qem) or an exact budget rule (--avg-bits / --max-bytes). Prints the "
        "per-layer table; writes the config only with --out (without it, a dry run). " + MODEL_HELP,
    )
    p.add_argument("model", metavar="MODEL", help="package.module:factory, a TorchScript file, or a torch.save file")
    p.add_argument("--bits", type=parse_bits, default=list(range(2, 9)), help="candidate bit-widths, e.g. 2-8 or 2,4,8 (default 2-8)")
    rule = p.add_mutually_exclusive_group(required=True)
    rule.add_argument("--qem", type=float, help="quantization error multiplier: smallest bits with err(b) <= QEM * err(ref)")
    rule.add_argument("--avg-bits", type=float, help="parameter-weighted average bit-width budget (exact knapsack)")
    rule.add_argument("--max-bytes", type=int, help="budget on packed weights + scales + zero points, in bytes")
    p.add_argument("--ref-bits", type=int, default=8, help="QEM reference bit-width (default 8)")
    p.add_argument("--qem-reference", choices=["layer", "model"], default="layer",
                   help="QEM reference: the layer's own error at --ref-bits, or the median normalised error over layers")
    p.add_argument("--objective", choices=OBJECTIVES, default=DEFAULT_OBJECTIVE,
                   help=f"per-layer error summed by the budget rule (default {DEFAULT_OBJECTIVE})")
    gran = p.add_mutually_exclusive_group()
    gran.add_argument("--per-channel", dest="per_channel", action="store_true", default=True,
                      help="one scale per output channel (default)")
    gran.add_argument("--per-tensor", dest="per_channel", action="store_false", help="one scale per layer")
    p.add_argument("--symmetric", action="store_true", help="symmetric quantizer (default asymmetric)")
    p.add_argument("--clip", choices=["minmax", "mse"], default="minmax", help="range: min/max, or the clipping search")
    p.add_argument("--keep", action="append", metavar="NAME=BITS",
                   help="pin a layer's bits; repeat it for more layers: --keep conv1=8 --keep fc=8")
    p.add_argument("--keep-first-last", type=int, metavar="BITS",
                   help="pin the first and the last layer (in execution order, found on a random input of "
                   "--input-shape) at BITS, e.g. 8")
    p.add_argument("--input-shape", type=parse_shape, metavar="C,H,W",
                   help="one input's shape without the batch dimension, for --keep-first-last (e.g. 3,224,224)")
    p.add_argument("--backend", choices=["native", "reference"], default=None, help="kernel backend (default native)")
    p.add_argument("--threads", type=int, default=None, help="native threads (default MIXQUANT_NUM_THREADS or torch's)")
    p.add_argument("--out", help="where to write the bit config (JSON); without it nothing is written")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..api.search import search

    keep = parse_keep(args.keep)
    if args.input_shape is not None and args.keep_first_last is None:
        raise ValueError("--input-shape is only used by --keep-first-last")
    if args.out and os.path.exists(args.out) and not args.overwrite:  # fail before the work, not after
        raise FileExistsError(f"{args.out!r} exists; pass --overwrite to replace it")
    model = load_cli_model(args)
    if args.keep_first_last is not None:
        pinned = first_last_keep(model, args.keep_first_last, args.input_shape)
        clash = {n: b for n, b in keep.items() if n in pinned and b != pinned[n]}
        if clash:
            name = next(iter(clash))
            raise ValueError(f"--keep {name}={clash[name]} and --keep-first-last {args.keep_first_last} "
                             f"disagree on layer {name!r}")
        keep = {**pinned, **keep}
    config = search(
        model, args.bits, qem=args.qem, ref_bits=args.ref_bits, qem_reference=args.qem_reference,
        avg_bits=args.avg_bits, max_bytes=args.max_bytes, objective=args.objective,
        per_channel=args.per_channel, symmetric=args.symmetric, clip=args.clip, keep=keep,
        backend=args.backend, num_threads=args.threads, progress=True,
    )
    print(config)
    if args.out:
        config.save(args.out, overwrite=args.overwrite)
        print(f"wrote {args.out}")
    else:
        print("dry run: no file written (pass --out FILE to save the config)")
    return 0
