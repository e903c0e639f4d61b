"""``mixquant search``: find per-layer bit-widths and write them as a bit config.

MODEL is a model (factory, TorchScript or torch.save file) or a safetensors
checkpoint (a ``.safetensors`` file or a folder of shards), searched without
the model.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
from typing import Dict, List, Optional, Tuple, Union

from . import COMMANDS
from .common import DATA_HELP, MODEL_HELP, add_data_options, add_model_options, load_calib, load_cli_model


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


def parse_group_size(text: str) -> Union[None, int, List[Optional[int]]]:
    """'128' -> 128; 'none' -> None; 'none,128,64' -> [None, 128, 64] (the budget rule chooses per layer)."""
    items = [t.strip().lower() for t in text.split(",")]
    try:
        values = [None if t in ("none", "channel") else int(t) for t in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must look like '128', 'none' or 'none,128,64', got {text!r}") \
            from None
    if any(v is not None and v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"group sizes must be >= 1, got {text!r}")
    return values[0] if len(values) == 1 else values


def is_checkpoint(path: str) -> bool:
    """Whether MODEL names a safetensors checkpoint: a .safetensors file or a folder."""
    return os.path.isdir(path) or path.endswith(".safetensors")


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
    from ..core.limits import DEFAULT_DATA_SENSITIVITY, DEFAULT_OBJECTIVE, OBJECTIVES, OUTPUT_LOSSES, SENSITIVITIES

    p = sub.add_parser(
        "search",
        help=COMMANDS["search"][1],
        description="Measure every layer's roundoff error at each candidate bit-width and choose "
        "per-layer bits by the QEM rule (--qem) or an exact budget rule (--avg-bits / --max-bytes / "
        "--bits-per-weight). Prints the per-layer table; writes the config only with --out (without it, a dry "
        "run). " + MODEL_HELP + " MODEL may also be a safetensors checkpoint (a .safetensors "
        "file, or a folder of shards with or without model.safetensors.index.json): every tensor of 2+ "
        "dimensions named '*.weight' is then a layer, named without '.weight', read one run of rows at a time.",
    )
    p.add_argument("model", metavar="MODEL",
                   help="package.module:factory, a TorchScript file, a torch.save file, or a safetensors checkpoint "
                        "(a .safetensors file or a folder of shards) searched without the model")
    p.add_argument("--bits", type=parse_bits, default=list(range(2, 9)), help="candidate bit-widths, e.g. 2-8 or 2,4,8 (default 2-8)")
    rule = p.add_mutually_exclusive_group(required=True)
    rule.add_argument("--qem", type=float, help="quantization error multiplier: smallest bits with err(b) <= QEM * err(ref)")
    rule.add_argument("--avg-bits", type=float, help="parameter-weighted average bit-width budget (exact knapsack)")
    rule.add_argument("--max-bytes", type=int, help="budget on packed weights + scales + zero points, in bytes")
    rule.add_argument("--bits-per-weight", type=float,
                      help="budget on stored bits per weight, scales and zero points included")
    p.add_argument("--ref-bits", type=int, default=8, help="QEM reference bit-width (default 8)")
    p.add_argument("--qem-reference", choices=["layer", "model"], default="layer",
                   help="QEM reference: the layer's own error at --ref-bits, or the median normalised error over layers")
    p.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help=f"per-layer error of the data-free table summed by the budget rule (default {DEFAULT_OBJECTIVE})")
    p.add_argument("--sensitivity", choices=SENSITIVITIES, default=None,
                   help="what a layer's cost at a bit-width is: 'weight' (the data-free roundoff error, the default "
                   f"without --calib), or measured on --calib: input, output, fisher, model (default with --calib: "
                   f"{DEFAULT_DATA_SENSITIVITY}; costs grow with --calib-samples, 'model' most)")
    p.add_argument("--calib", help="calibration data for a data-aware sensitivity: " + DATA_HELP
                   + "; or a .pt file holding a dict of keyword inputs (input_ids, attention_mask, ...)")
    p.add_argument("--calib-samples", type=int, default=None, help="use at most this many calibration samples")
    p.add_argument("--output-loss", choices=OUTPUT_LOSSES, default="kl",
                   help="how the model's outputs are compared: kl (logits of classifiers and language models, the "
                   "default), cosine or mse (embeddings and other outputs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random readout of non-logit outputs (default 0)")
    gran = p.add_mutually_exclusive_group()
    gran.add_argument("--per-channel", dest="per_channel", action="store_true", default=True,
                      help="one scale per output channel (default)")
    gran.add_argument("--per-tensor", dest="per_channel", action="store_false", help="one scale per layer")
    p.add_argument("--group-size", type=parse_group_size, default=None, metavar="N|none|LIST",
                   help="groups of N consecutive weights per output channel (bfloat16 scales); 'none' is per "
                        "channel; a list such as none,128,64 lets the budget rule (--bits-per-weight or "
                        "--max-bytes) choose per layer")
    p.add_argument("--symmetric", action="store_true", help="symmetric quantizer (default asymmetric)")
    p.add_argument("--clip", choices=["minmax", "mse"], default="minmax", help="range: min/max, or the clipping search")
    p.add_argument("--keep", action="append", metavar="NAME=BITS",
                   help="pin a layer's bits; repeat it for more layers: --keep conv1=8 --keep fc=8")
    p.add_argument("--keep-first-last", type=int, metavar="BITS",
                   help="pin the first and the last layer (in execution order, found on a random input of "
                   "--input-shape) at BITS, e.g. 8")
    p.add_argument("--input-shape", type=parse_shape, metavar="C,H,W",
                   help="one input's shape without the batch dimension, for --keep-first-last (e.g. 3,224,224)")
    p.add_argument("--embeddings", action="store_true",
                   help="also quantize nn.Embedding layers of MODEL (a checkpoint's embeddings are always included)")
    p.add_argument("--include", nargs="*", metavar="GLOB", help="only layers whose name matches one of these globs")
    p.add_argument("--exclude", nargs="*", metavar="GLOB", help="leave out layers whose name matches one of these")
    p.add_argument("--transposed", nargs="*", metavar="GLOB",
                   help="checkpoint layers with output channels on axis 1 (GPT-2 Conv1D, ConvTranspose)")
    p.add_argument("--backend", choices=["native", "reference"], default=None, help="kernel backend (default native)")
    p.add_argument("--threads", type=int, default=None, help="native threads (default MIXQUANT_NUM_THREADS or torch's)")
    add_data_options(p)
    p.add_argument("--out", help="where to write the bit config (JSON); without it nothing is written")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..api.checkpoint import search_checkpoint
    from ..api.search import search
    from ..io.files import check_destination
    from .ranks import join, on_every, on_main

    w = join()  # under torchrun: the ranks split a checkpoint's layers; rank 0 writes
    keep = parse_keep(args.keep)
    if args.input_shape is not None and args.keep_first_last is None:
        raise ValueError("--input-shape is only used by --keep-first-last")
    if args.out:  # before the work, not after it
        on_main(w, lambda: check_destination(args.out, args.overwrite), "checking --out")
    common = dict(
        qem=args.qem, ref_bits=args.ref_bits, qem_reference=args.qem_reference, avg_bits=args.avg_bits,
        max_bytes=args.max_bytes, bits_per_weight=args.bits_per_weight, objective=args.objective,
        per_channel=args.per_channel, symmetric=args.symmetric, clip=args.clip, group_size=args.group_size,
        keep=keep, backend=args.backend, num_threads=args.threads, progress=w.is_main,
    )
    if is_checkpoint(args.model):
        if args.sensitivity not in (None, "weight") or args.calib:
            raise ValueError("a checkpoint is searched without its model: only the data-free table "
                             "(--sensitivity weight) applies; give a MODEL for --calib")
        if common["objective"] is None:
            del common["objective"]
        if args.keep_first_last is not None:
            raise ValueError("--keep-first-last needs a MODEL to run; for a checkpoint, pin layers with --keep NAME=BITS")
        if args.weights:
            raise ValueError("--weights applies to a MODEL, not to a checkpoint")
        if args.embeddings:
            raise ValueError("--embeddings applies to a MODEL; a checkpoint's embeddings are included (use --exclude)")
        config = search_checkpoint(args.model, args.bits, include=args.include, exclude=args.exclude,
                                   transposed=args.transposed, distributed=w.distributed, **common)
    else:
        if args.transposed:
            raise ValueError("--transposed applies to checkpoints; a MODEL's layers know their channel axis")
        include, exclude = args.include, args.exclude

        def selected(_module, name: str) -> bool:
            return (include is None or any(fnmatch.fnmatchcase(name, g) for g in include)) \
                and not any(fnmatch.fnmatchcase(name, g) for g in exclude or ())

        def model_search():
            model = load_cli_model(args)
            if args.keep_first_last is not None:
                pinned = first_last_keep(model, args.keep_first_last, args.input_shape)
                clash = {n: b for n, b in keep.items() if n in pinned and b != pinned[n]}
                if clash:
                    name = next(iter(clash))
                    raise ValueError(f"--keep {name}={clash[name]} and --keep-first-last {args.keep_first_last} "
                                     f"disagree on layer {name!r}")
                common["keep"] = {**pinned, **keep}
            calib = load_calib(args.calib, image_size=args.image_size, resize=args.resize) if args.calib else None
            return search(model, args.bits, filter_fn=selected, embeddings=args.embeddings,
                          sensitivity=args.sensitivity, calib_data=calib, calib_samples=args.calib_samples,
                          output_loss=args.output_loss, seed=args.seed, **common)

        config = on_every(w, model_search, "the search")  # not split: every rank searches the whole model
    if args.out:
        on_main(w, lambda: config.save(args.out, overwrite=args.overwrite), "writing --out")
    if w.is_main:
        print(config)
        print(f"wrote {args.out}" if args.out else "dry run: no file written (pass --out FILE to save the config)")
    return 0
