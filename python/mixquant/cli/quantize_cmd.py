"""``mixquant quantize``: apply a bit config to a model with a quantization method and save it packed."""

from __future__ import annotations

import argparse

import torch

from .common import DATA_HELP, MODEL_HELP, add_data_options, add_trust_file_option, load_inputs, load_model

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a model with a bit config (vanilla asymmetric or BRECQ) and save it with packed weights",
        description="Apply the per-layer weight bits of --config (from `mixquant search`) to MODEL with "
        "vanilla asymmetric round-to-nearest or BRECQ, and write the quantized model as safetensors with "
        "packed integer weights (read it back with `mixquant evaluate` or mixquant.load_quantized). " + MODEL_HELP,
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
    p.add_argument("--iters", type=int, default=None, help="brecq: AdaRound iterations per unit (default 20000)")
    p.add_argument("--act-iters", type=int, default=None, help="brecq: step-size iterations per unit (default 5000)")
    p.add_argument("--num-samples", type=int, default=None, help="brecq: calibration samples used (default 1024)")
    p.add_argument("--batch-size", type=int, default=None, help="brecq: samples per iteration (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_data_options(p)
    p.add_argument("--format", choices=["safetensors", "onnx"], default="safetensors",
                   help="safetensors: packed codes for mixquant.load_quantized (default); onnx: a QDQ graph for "
                        "ONNX Runtime (needs onnx and onnxscript; traced on one --calib sample or --input-shape)")
    p.add_argument("--input-shape", default=None, metavar="N,C,H,W",
                   help="onnx: shape of the example input to trace (default: the first --calib sample)")
    p.add_argument("--out", required=True, help="where to write the quantized model (.safetensors or .onnx)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_trust_file_option(p)
    p.set_defaults(func=run)


def _inputs(args: argparse.Namespace):
    """The model, config, calibration data, ONNX example input and method options the arguments name."""
    from ..allocation.bitconfig import BitConfig

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    model = load_model(args.model, trust_file=args.trust_file)
    config = BitConfig.load(args.config)
    calib = None
    if args.calib:
        x, y = load_inputs(args.calib, image_size=args.image_size, resize=args.resize)
        calib = x if y is None else [(x, y)]
    elif args.method == "brecq" or args.act_bits is not None:
        raise ValueError(f"--calib is required with --method {args.method}" if args.method == "brecq"
                         else "--calib is required with --act-bits")
    example = None
    if args.format == "onnx":
        if args.input_shape:
            try:
                shape = [int(d) for d in args.input_shape.split(",")]
            except ValueError:
                raise ValueError(f"--input-shape must be comma-separated sizes like 1,3,224,224, "
                                 f"got {args.input_shape!r}") from None
            if not shape or min(shape) < 1:
                raise ValueError(f"--input-shape sizes must be >= 1, got {args.input_shape!r}")
            example = torch.zeros(shape)
        elif calib is not None:
            example = (calib if isinstance(calib, torch.Tensor) else calib[0][0])[:1]
        else:
            raise ValueError("--format onnx needs an example input: --calib or --input-shape")
    elif args.input_shape:
        raise ValueError("--input-shape only applies to --format onnx")
    options = {}
    if args.method == "brecq":
        for name in ("iters", "act_iters", "num_samples", "batch_size"):
            value = getattr(args, name)
            if value is not None:
                options[name] = value
    else:
        given = [f"--{n.replace('_', '-')}" for n in ("iters", "act_iters", "num_samples", "batch_size")
                 if getattr(args, n) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply to --method brecq")
    return model, config, calib, example, options


def run(args: argparse.Namespace) -> int:
    from ..api.quantize import quant_info, quantize
    from ..io.export import export
    from ..io.files import check_destination
    from .ranks import join, on_every, on_main

    w = join()  # under torchrun: BRECQ's ranks share the calibration data; rank 0 writes
    on_main(w, lambda: check_destination(args.out, args.overwrite), "checking --out")  # before the work
    model, config, calib, example, options = on_every(w, lambda: _inputs(args), "reading the inputs")
    if args.method == "brecq" and w.distributed:
        options["distributed"] = True  # every rank read the whole --calib; each reconstructs on its block
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
