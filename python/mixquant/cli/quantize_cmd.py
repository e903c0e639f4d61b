"""``mixquant quantize``: apply a bit config to a model with a quantization method and save it packed."""

from __future__ import annotations

import argparse

from ..presets import BRECQ_PRESETS, DEFAULT_PRESET
from . import COMMANDS
from .common import DATA_HELP, MODEL_HELP, add_data_options, add_model_options, load_cli_model, load_inputs, set_threads

_BRECQ_SIZES = ("iters", "act_iters", "num_samples", "batch_size")
# Measured with benchmarks/bench_presets.py on a 2-core machine (docs/BENCHMARKS.md, "BRECQ presets");
# reconstruction only, without caching.
PRESET_HELP = (
    "brecq: the size of the run. 'cpu' (default): {cpu[iters]} iterations per unit ({cpu[act_iters]} for "
    "activation steps), {cpu[num_samples]} samples, batch {cpu[batch_size]}, one thread: about 1 min for a ResNet-20 on "
    "28x28 inputs and 20 min for MobileNetV2 at 224x224 on 2 cores. 'paper': BRECQ's ImageNet script, "
    "{paper[iters]} iterations ({paper[act_iters]}), {paper[num_samples]} samples, batch {paper[batch_size]}, "
    "torch's threads: "
    "about 2 h for the ResNet-20 and 70 h for MobileNetV2 on the same CPU (a GPU job). "
    "--iters, --act-iters, --num-samples and --batch-size override single fields"
).format(**BRECQ_PRESETS)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help=COMMANDS["quantize"][1],
        description="Apply the per-layer weight bits of --config (from `mixquant search`) to MODEL, exactly as "
        "configured, with vanilla asymmetric round-to-nearest or BRECQ, and write the quantized model as "
        "safetensors with packed integer weights (read it back with `mixquant evaluate` or "
        "mixquant.load_quantized). A TorchScript MODEL supports weight-only asymmetric quantization. " + MODEL_HELP,
    )
    p.add_argument("model", metavar="MODEL", help="package.module:factory, a TorchScript file, or a torch.save file")
    p.add_argument("--config", required=True, help="bit config JSON written by `mixquant search` (or BitConfig.save)")
    p.add_argument("--method", choices=["asymmetric", "brecq"], default="asymmetric",
                   help="quantization method (default asymmetric)")
    p.add_argument("--calib", help="calibration data (needed by brecq and --act-bits): " + DATA_HELP)
    p.add_argument("--act-bits", type=int, default=None, help="also quantize activations to this many bits")
    gran = p.add_mutually_exclusive_group()
    gran.add_argument("--per-channel", dest="per_channel", action="store_true", default=None,
                      help="one scale per output channel (default: as the config)")
    gran.add_argument("--per-tensor", dest="per_channel", action="store_false", help="one scale per layer")
    cpu = BRECQ_PRESETS[DEFAULT_PRESET]
    p.add_argument("--preset", choices=sorted(BRECQ_PRESETS), default=None, help=PRESET_HELP)
    p.add_argument("--iters", type=int, default=None,
                   help=f"brecq: AdaRound iterations per unit (default {cpu['iters']}, from --preset)")
    p.add_argument("--act-iters", type=int, default=None,
                   help=f"brecq: step-size iterations per unit with --act-bits (default {cpu['act_iters']})")
    p.add_argument("--num-samples", type=int, default=None,
                   help=f"brecq: calibration samples used (default {cpu['num_samples']})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"brecq: samples per iteration (default {cpu['batch_size']})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws (default 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; BRECQ: the preset's)")
    add_data_options(p)
    p.add_argument("--format", choices=["safetensors", "onnx"], default="safetensors",
                   help="safetensors: packed codes for mixquant.load_quantized (default); onnx: a QDQ graph for "
                        "ONNX Runtime (needs onnx and onnxscript; traced on one --calib sample or --input-shape)")
    p.add_argument("--input-shape", default=None, metavar="N,C,H,W",
                   help="onnx: shape of the example input to trace (default: the first --calib sample)")
    p.add_argument("--out", required=True, help="where to write the quantized model (.safetensors or .onnx)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_model_options(p)
    p.set_defaults(func=run)


def calib_count(calib) -> int:
    """Samples in --calib as run() hands it on (a tensor, or one (inputs, labels) batch)."""
    return 0 if calib is None else int((calib if not isinstance(calib, list) else calib[0][0]).shape[0])


def _onnx_example(args: argparse.Namespace, calib):
    """The example input that --format onnx traces (None for safetensors)."""
    import torch

    if args.format != "onnx":
        if args.input_shape:
            raise ValueError("--input-shape only applies to --format onnx")
        return None
    if args.input_shape:
        try:
            shape = [int(d) for d in args.input_shape.split(",")]
        except ValueError:
            raise ValueError(f"--input-shape must be comma-separated sizes like 1,3,224,224, "
                             f"got {args.input_shape!r}") from None
        if not shape or min(shape) < 1:
            raise ValueError(f"--input-shape sizes must be >= 1, got {args.input_shape!r}")
        return torch.zeros(shape)
    if calib is not None:
        return (calib if not isinstance(calib, list) else calib[0][0])[:1]
    raise ValueError("--format onnx needs an example input: --calib or --input-shape")


def _inputs(args: argparse.Namespace):
    """The model, config, calibration data, ONNX example input and method options the arguments name
    (read and checked on each rank: no collective call)."""
    from ..allocation.bitconfig import BitConfig
    from ..presets import brecq_preset

    options = {}
    if args.method == "brecq":
        options = brecq_preset(args.preset or DEFAULT_PRESET)
        options.update({n: getattr(args, n) for n in _BRECQ_SIZES if getattr(args, n) is not None})
        if args.threads is not None:  # an explicit --threads wins over the preset's
            options["num_threads"] = args.threads
    else:
        given = [f"--{n.replace('_', '-')}" for n in _BRECQ_SIZES + ("preset",) if getattr(args, n) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply to --method brecq")
    set_threads(args.threads)
    config = BitConfig.load(args.config)
    model = load_cli_model(args)
    calib = None
    if args.calib:
        x, y = load_inputs(args.calib, image_size=args.image_size, resize=args.resize)
        calib = x if y is None else [(x, y)]
    elif args.method == "brecq" or args.act_bits is not None:
        raise ValueError(f"--calib is required with --method {args.method}" if args.method == "brecq"
                         else "--calib is required with --act-bits")
    return model, config, calib, _onnx_example(args, calib), options


def run(args: argparse.Namespace) -> int:
    from ..api.quantize import quant_info, quantize
    from ..io.export import export
    from ..io.files import check_destination
    from .ranks import join, on_every, on_main

    w = join()  # under torchrun: BRECQ's ranks share the calibration data; rank 0 writes
    on_main(w, lambda: check_destination(args.out, args.overwrite), "checking --out")  # before the work
    model, config, calib, example, options = on_every(w, lambda: _inputs(args), "reading the inputs")
    split = ""
    if args.method == "brecq" and w.distributed:
        options["distributed"] = True  # every rank read the whole --calib; each reconstructs on its block
        split = f", the samples split between {w.world_size} ranks"
    what = (f"BRECQ, preset {args.preset or DEFAULT_PRESET} ({options['iters']} iterations per unit on "
            f"{min(options['num_samples'], calib_count(calib))} samples{split}, batch {options['batch_size']}; a "
            "progress bar per unit shows its time left)" if args.method == "brecq"
            else "vanilla asymmetric round-to-nearest")
    if w.is_main:
        print(f"quantizing {args.model}: {len(config.bits)} layers at an average of {config.avg_bits:.3f} bits "
              f"with {what}", flush=True)
    qmodel = quantize(model, config, args.method, calib_data=calib, act_bits=args.act_bits,
                      per_channel=args.per_channel, seed=args.seed, progress=w.is_main, **options)
    if args.format == "onnx":
        from ..io.onnx_export import export_onnx

        # atomic as well
        onnx_info = on_main(w, lambda: export_onnx(qmodel, args.out, example, overwrite=args.overwrite),
                            "writing --out")
        if w.is_main:
            print(quant_info(qmodel))
            print(onnx_info.table())
        return 0
    info = on_main(w, lambda: export(qmodel, args.out, overwrite=args.overwrite), "writing --out")  # atomic
    if w.is_main:
        print(quant_info(qmodel))
        print(f"wrote {args.out} ({info.file_bytes} bytes: {info.quantized_bytes} of packed weights, scales and "
              f"zero points, {info.float_bytes} of other float tensors)")
    return 0
