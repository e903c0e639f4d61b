"""``mixquant quantize``: apply a bit config to a model with a quantization method and save it packed."""

from __future__ import annotations

import argparse
import os
from typing import Optional, Tuple

import torch

from .model_io import MODEL_HELP, add_trust_file_option, load_model

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DATA_HELP = (
    "a .pt file read with torch.load(weights_only=True) holding a tensor [N, ...] of model-ready inputs, an "
    "(inputs, labels) tuple, or a dict with 'x' (and optionally 'y'); or a folder of images, each resized "
    "(shorter side to --resize), centre-cropped to --image-size and normalised with the ImageNet mean/std"
)


def load_inputs(path: str, *, image_size: int = 224, resize: Optional[int] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Inputs (and labels, when the file has them) from a tensor file or a folder of images (see DATA_HELP)."""
    if os.path.isdir(path):
        return _load_folder(path, image_size, resize), None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} is neither a file nor a folder")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report any unreadable file the same way
        raise ValueError(f"{path!r} is not a tensor file that torch.load(weights_only=True) can read: "
                         f"{str(exc).splitlines()[0][:200]}") from None
    x = y = None
    if isinstance(obj, torch.Tensor):
        x = obj
    elif isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj):
        x, y = obj
    elif isinstance(obj, dict):
        x = next((obj[k] for k in ("x", "inputs", "images") if k in obj), None)
        y = next((obj[k] for k in ("y", "labels", "targets") if k in obj), None)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{path!r} must hold a tensor, an (inputs, labels) tuple or a dict with 'x' "
                         f"(and 'y'); found {type(obj).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{path!r}: inputs must be floating point, got {x.dtype}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{path!r}: inputs must be a non-empty batch [N, ...], got shape {tuple(x.shape)}")
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"{path!r}: labels must be a 1-D tensor with one label per input")
        y = y.long()
    return x.float(), y


def _load_folder(folder: str, image_size: int, resize: Optional[int]) -> torch.Tensor:
    from ..zoo import imagenet_preprocess

    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover
        raise ImportError("reading a folder of images needs Pillow: pip install pillow") from exc
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise ValueError(f"folder {folder!r} holds no images ({', '.join(IMAGE_EXTS)})")
    resize = resize or int(round(image_size * 256 / 224))
    out = []
    for f in files:
        with Image.open(os.path.join(folder, f)) as im:
            out.append(imagenet_preprocess(im.convert("RGB"), resize=resize, size=image_size))
    return torch.stack(out)


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", type=int, default=224, help="crop size for a folder of images (default 224)")
    p.add_argument("--resize", type=int, default=None,
                   help="shorter side before cropping, for a folder of images (default image-size x 256/224)")


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
    p.add_argument("--out", required=True, help="where to write the quantized model (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_trust_file_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bitconfig import BitConfig
    from ..experiments.runner import quantize_fn
    from ..export import export
    from ..quantize import quant_info

    if os.path.exists(args.out) and not args.overwrite:
        raise FileExistsError(f"{args.out!r} exists; pass --overwrite to replace it")
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
    quantize = quantize_fn()
    qmodel = quantize(model, config, args.method, calib_data=calib, act_bits=args.act_bits,
                      per_channel=args.per_channel, seed=args.seed, progress=True, **options)
    info = export(qmodel, args.out, overwrite=args.overwrite)  # atomic: temporary file + rename
    print(quant_info(qmodel))
    print(f"wrote {args.out} ({info.file_bytes} bytes: {info.quantized_bytes} of packed weights, scales and "
          f"zero points, {info.float_bytes} of other float tensors)")
    return 0
