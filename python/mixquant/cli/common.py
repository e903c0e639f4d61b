"""What several commands share: the MODEL and data options, and reading inputs from files."""

from __future__ import annotations

import argparse
import os
from typing import Optional, Tuple

import torch

from ..io.models import MODEL_HELP, load_model

__all__ = ["MODEL_HELP", "DATA_HELP", "load_model", "load_inputs", "load_calib", "add_data_options",
           "add_trust_file_option"]


def add_trust_file_option(p: argparse.ArgumentParser) -> None:
    """The --trust-file switch of every command that loads MODEL."""
    p.add_argument("--trust-file", action="store_true",
                   help="allow loading MODEL from a TorchScript file or a pickled whole module; both can run code "
                   "from the file when loaded, so only for files from a source you trust")


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DATA_HELP = (
    "a .pt file read with torch.load(weights_only=True) holding a tensor [N, ...] of model-ready inputs, an "
    "(inputs, labels) tuple, or a dict with 'x' (and optionally 'y'); or a folder of images, each resized "
    "(shorter side to --resize), centre-cropped to --image-size and normalised with the ImageNet mean/std"
)


_INPUT_KEYS = ("x", "inputs", "images")
_LABEL_KEYS = ("y", "labels", "targets")


def _load_tensor_file(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report any unreadable file the same way
        raise ValueError(f"{path!r} is not a tensor file that torch.load(weights_only=True) can read: "
                         f"{str(exc).splitlines()[0][:200]}") from None


def _inputs_from(obj, path: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    x = y = None
    if isinstance(obj, torch.Tensor):
        x = obj
    elif isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj):
        x, y = obj
    elif isinstance(obj, dict):
        x = next((obj[k] for k in _INPUT_KEYS if k in obj), None)
        y = next((obj[k] for k in _LABEL_KEYS if k in obj), None)
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


def load_inputs(path: str, *, image_size: int = 224, resize: Optional[int] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Inputs (and labels, when the file has them) from a tensor file or a folder of images (see DATA_HELP)."""
    if os.path.isdir(path):
        return _load_folder(path, image_size, resize), None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} is neither a file nor a folder")
    return _inputs_from(_load_tensor_file(path), path)


def load_calib(path: str, *, image_size: int = 224, resize: Optional[int] = None):
    """Calibration data for the search: what :func:`load_inputs` reads, or a tensor file holding a dict of
    keyword inputs (``{"input_ids": ..., "attention_mask": ...}``, for models called with keywords)."""
    if os.path.isfile(path):
        obj = _load_tensor_file(path)
        if isinstance(obj, dict) and obj and not any(k in obj for k in _INPUT_KEYS) \
                and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
        x, y = _inputs_from(obj, path)
    else:
        x, y = load_inputs(path, image_size=image_size, resize=resize)
    return x if y is None else [(x, y)]


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
        path = os.path.join(folder, f)
        if not os.path.isfile(path):  # a folder or FIFO named like an image
            raise ValueError(f"{path!r} is not a regular file; the image folder may hold only image files")
        try:
            with Image.open(path) as im:
                out.append(imagenet_preprocess(im.convert("RGB"), resize=resize, size=image_size))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            # PIL reports unreadable or damaged images as OSError (UnidentifiedImageError), ValueError or SyntaxError.
            raise ValueError(f"{path!r} is not a readable image ({type(exc).__name__}: {exc})") from None
    return torch.stack(out)


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", type=int, default=224, help="crop size for a folder of images (default 224)")
    p.add_argument("--resize", type=int, default=None,
                   help="shorter side before cropping, for a folder of images (default image-size x 256/224)")
