"""``mixquant evaluate``: accuracy of a quantized model file, and its fidelity to the float model."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Optional

from ..io.files import check_destination, write_text_atomic
from . import COMMANDS
from .common import DATA_HELP, MODEL_HELP, add_data_options, add_model_options, load_inputs, set_threads

if TYPE_CHECKING:
    import torch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help=COMMANDS["evaluate"][1],
        description="Load QMODEL (written by `mixquant quantize` or mixquant.export) into a fresh MODEL, run both "
        "on --data and report top-1 accuracy of each (when the data has labels), the share of inputs where "
        "their top-1 classes agree and the mean KL(float || quantized) of their softmax outputs. " + MODEL_HELP,
    )
    p.add_argument("model", metavar="MODEL", help="the float model: package.module:factory, TorchScript or torch.save file")
    p.add_argument("qmodel", metavar="QMODEL", help="the quantized model file (.safetensors)")
    p.add_argument("--data", required=True, help="evaluation data: " + DATA_HELP)
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default 256)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_data_options(p)
    add_model_options(p)
    p.set_defaults(func=run)


def _logits(model: "torch.nn.Module", x: "torch.Tensor", bs: int) -> "torch.Tensor":
    import torch

    model.eval()
    with torch.no_grad():
        outs = [model(x[i:i + bs]) for i in range(0, x.shape[0], bs)]
    if not all(isinstance(o, torch.Tensor) and o.dim() == 2 for o in outs):
        raise ValueError("evaluate needs a classifier whose output is logits [batch, classes]")
    return torch.cat(outs).float()


def evaluate_files(model_spec: str, qpath: str, x: "torch.Tensor", y=None, *, batch_size: int = 256,
                   trust_file: bool = False, weights: Optional[str] = None) -> dict:
    """Numbers reported by ``mixquant evaluate`` (also usable from Python)."""
    import torch.nn.functional as F

    from ..api.quantize import quant_info
    from ..io.export import load_quantized
    from ..io.models import load_model

    if batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    fp_model = load_model(model_spec, trust_file=trust_file, weights=weights)
    qmodel = load_quantized(qpath, load_model(model_spec, trust_file=trust_file, weights=weights))
    lf = _logits(fp_model, x, batch_size)
    lq = _logits(qmodel, x, batch_size)
    logp, logq = F.log_softmax(lf, 1), F.log_softmax(lq, 1)
    info = quant_info(qmodel)
    out = {
        "samples": int(x.shape[0]),
        "method": info.method,
        "avg_bits": info.avg_bits,
        "size_bytes": info.size_bytes,
        "agreement": (lq.argmax(1) == lf.argmax(1)).float().mean().item(),
        "kl": (logp.exp() * (logp - logq)).sum(1).clamp_min(0).mean().item(),
    }
    if y is not None:
        if int(y.min()) < 0 or int(y.max()) >= lf.shape[1]:
            raise ValueError(f"labels must be class indices in [0, {lf.shape[1]})")
        out["float_top1"] = (lf.argmax(1) == y).float().mean().item()
        out["quantized_top1"] = (lq.argmax(1) == y).float().mean().item()
    return out


def format_kl(kl: float) -> str:
    """KL in four significant digits (0.00001234 stays readable, 0 is 0)."""
    return "0" if kl == 0 else f"{kl:.4g}"


def run(args: argparse.Namespace) -> int:
    if args.json:
        check_destination(args.json, args.overwrite)  # before the work, not after it
    set_threads(args.threads)
    x, y = load_inputs(args.data, image_size=args.image_size, resize=args.resize)
    res = evaluate_files(args.model, args.qmodel, x, y, batch_size=args.batch_size, trust_file=args.trust_file,
                         weights=args.weights)
    print(f"{res['samples']} inputs; quantized model: {res['method']}, average {res['avg_bits']:.3f} weight bits, "
          f"{res['size_bytes']} bytes of packed weights, scales and zero points")
    if "float_top1" in res:
        print(f"top-1 accuracy: float {100 * res['float_top1']:.2f} %, quantized {100 * res['quantized_top1']:.2f} %")
    else:
        print("no labels in --data: accuracy not measured")
    print(f"top-1 agreement with the float model: {100 * res['agreement']:.2f} %")
    print(f"mean KL(float || quantized): {format_kl(res['kl'])} nats")
    if args.json:
        write_text_atomic(args.json, json.dumps(res, indent=1) + "\n", args.overwrite)
        print(f"wrote {args.json}")
    return 0
