"""What several commands share: the MODEL and data options, and reading inputs from files.

torch is imported inside the functions, so that building a command's parser
(``mixquant search --help``) stays instant.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, List, Optional, Tuple

from ..io.models import MODEL_HELP, load_model

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

__all__ = ["MODEL_HELP", "DATA_HELP", "load_model", "load_cli_model", "load_inputs", "load_calib", "add_data_options",
           "add_model_options", "add_trust_file_option", "set_threads"]


def add_trust_file_option(p: argparse.ArgumentParser) -> None:
    """The --trust-file switch of every command that loads MODEL."""
    p.add_argument("--trust-file", action="store_true",
                   help="allow loading MODEL from a TorchScript file or a pickled whole module; both can run code "
                   "from the file when loaded, so only for files from a source you trust")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--weights and --trust-file: how MODEL is loaded."""
    p.add_argument("--weights", metavar="FILE",
                   help="load this state_dict into MODEL's model (a torch.save file read with "
                   "torch.load(weights_only=True), or .safetensors); every key must match")
    add_trust_file_option(p)


def load_cli_model(args: argparse.Namespace, spec: Optional[str] = None) -> "nn.Module":
    """MODEL (or ``spec``) loaded as the options in ``args`` say."""
    return load_model(spec or args.model, trust_file=args.trust_file, weights=getattr(args, "weights", None))


def set_threads(threads: Optional[int]) -> None:
    """``--threads``: torch's CPU threads (and so the native core's default)."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError("--threads must be >= 1")
    import torch

    torch.set_num_threads(threads)


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DATA_HELP = (
    "a .pt file read with torch.load(weights_only=True) holding a tensor [N, ...] of model-ready inputs, an "
    "(inputs, labels) tuple, or a dict with 'x' (and optionally 'y'); or a folder of images, each resized "
    "(shorter side to --resize), centre-cropped to --image-size and normalised with the ImageNet mean/std. "
    "A folder of class subfolders (torchvision's ImageFolder layout, DIR/CLASS/image.jpg) gives labels: "
    "the class index is the subfolder's position in sorted order"
)


_INPUT_KEYS = ("x", "inputs", "images")
_LABEL_KEYS = ("y", "labels", "targets")


def _load_tensor_file(path: str) -> object:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report any unreadable file the same way
        raise ValueError(f"{path!r} is not a tensor file that torch.load(weights_only=True) can read: "
                         f"{str(exc).splitlines()[0][:200]}") from None


def _inputs_from(obj: object, path: str) -> "Tuple[torch.Tensor, Optional[torch.Tensor]]":
    import torch

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
                ) -> "Tuple[torch.Tensor, Optional[torch.Tensor]]":
    """Inputs (and labels, when the file or folder has them) from a tensor file or a folder of images (see DATA_HELP)."""
    if os.path.isdir(path):
        return _load_folder(path, image_size, resize)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} is neither a file nor a folder")
    return _inputs_from(_load_tensor_file(path), path)


def load_calib(path: str, *, image_size: int = 224, resize: Optional[int] = None) -> object:
    """Calibration data for the search: what :func:`load_inputs` reads, or a tensor file holding a dict of
    keyword inputs (``{"input_ids": ..., "attention_mask": ...}``, for models called with keywords)."""
    import torch

    if os.path.isfile(path):
        obj = _load_tensor_file(path)
        if isinstance(obj, dict) and obj and not any(k in obj for k in _INPUT_KEYS) \
                and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
        x, y = _inputs_from(obj, path)
    else:
        x, y = load_inputs(path, image_size=image_size, resize=resize)
    return x if y is None else [(x, y)]


def _images_in(folder: str, recursive: bool) -> List[str]:
    """Image files under ``folder`` (sorted; hidden entries skipped), recursively or not."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        found += [os.path.join(root, f) for f in sorted(files)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTS)]
    return found


def _class_folders(folder: str) -> List[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _load_folder(folder: str, image_size: int, resize: Optional[int]
                 ) -> "Tuple[torch.Tensor, Optional[torch.Tensor]]":
    """A flat folder of images (no labels), or class subfolders (labels by sorted subfolder name)."""
    import torch

    top = _images_in(folder, recursive=False)
    classes = [c for c in _class_folders(folder) if _images_in(os.path.join(folder, c), recursive=True)]
    if top and classes:
        raise ValueError(f"folder {folder!r} holds images next to class subfolders ({classes[0]!r}, ...): put "
                         "every image in its class folder, or use a flat folder without labels")
    if not top and not classes:
        raise ValueError(f"folder {folder!r} holds no images ({', '.join(IMAGE_EXTS)}), nor class subfolders "
                         "with images")
    if top:
        return _read_images(top, image_size, resize), None
    empty = [c for c in _class_folders(folder) if c not in classes]
    if empty:  # a class without examples shifts every later label: refuse, as torchvision does
        raise ValueError(f"class folder {os.path.join(folder, empty[0])!r} holds no images")
    files: List[str] = []
    labels: List[int] = []
    for index, name in enumerate(classes):
        found = _images_in(os.path.join(folder, name), recursive=True)
        files += found
        labels += [index] * len(found)
    return _read_images(files, image_size, resize), torch.tensor(labels, dtype=torch.long)


def _read_images(files: List[str], image_size: int, resize: Optional[int]) -> "torch.Tensor":
    import torch

    from ..zoo import imagenet_preprocess

    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover
        raise ImportError("reading a folder of images needs Pillow: pip install pillow") from exc
    resize = resize or int(round(image_size * 256 / 224))
    out = []
    for path in files:
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
