"""Per-model experiment set-ups: model, calibration data, evaluation data and the grid to run.

Every set-up keeps calibration and evaluation data apart:

* ``mobilenet_v2``: calibration = random-resized crops of scikit-image's natural
  photos (none of them is an evaluation photo); evaluation = the 20 labelled
  ImageNet photos of foolbox, each seen through the five-crop grid of
  :func:`mixquant.zoo.imagenet_crops` (centre and four corners after resizing
  the shorter side to 256; ``Scale.crops`` views, up to 10 with mirror images):
  top-1 on the centre views (20 images), top-1 over all views, and top-1
  agreement / KL divergence to the FP32 model over all views.
* ``resnet20``: calibration = images drawn from the Fashion-MNIST training set;
  evaluation = the full 10k test set.
* ``mnist_ccexam`` / ``mnist_digit``: calibration = images drawn from MNIST's
  50k training split; evaluation = the 10k test set.

Sizes are scaled by a :class:`Scale` (``quick`` for tests, ``default`` for the
documented run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..nn.order import first_last_layers
from .names import SETUP_NAMES

__all__ = ["Scale", "Setup", "EvalData", "SETUP_NAMES", "build_setup", "first_last_layers"]


@dataclass(frozen=True)
class Scale:
    """How big a run is (``quick``: seconds, for tests; ``default``: the documented run)."""

    name: str
    eval_limit: Optional[int]  # evaluation images kept (None: all)
    crops: int  # views per ImageNet photo (grid mode)
    photos: Optional[int]  # labelled photos kept (None: all 20)
    calib: int  # calibration samples drawn
    brecq_scale: float  # multiplies each set-up's BRECQ iterations
    brecq_samples: Optional[int]  # overrides each set-up's BRECQ calibration size
    full_grid: bool  # run every study (quick runs a reduced grid)
    image_size: int = 224  # ImageNet crops (MobileNetV2)
    max_seeds: Optional[int] = None  # seeds kept of those requested (None: all)


# quick: every code path once, in seconds (small crops, one seed, BRECQ without iterations).
QUICK = Scale("quick", eval_limit=256, crops=2, photos=4, calib=16, brecq_scale=0.0, brecq_samples=8, full_grid=False,
              image_size=96, max_seeds=1)
DEFAULT = Scale("default", eval_limit=None, crops=5, photos=None, calib=256, brecq_scale=1.0, brecq_samples=None,
                full_grid=True)
SCALES = {"quick": QUICK, "default": DEFAULT}


@dataclass
class EvalData:
    """Evaluation inputs (already normalised), labels, and how to split them into reported metrics."""

    x: torch.Tensor
    y: torch.Tensor
    center_index: Optional[torch.Tensor] = None  # ImageNet: which rows are the centre views
    description: str = ""


@dataclass
class Setup:
    """One model's experiment: what to load, what to compare, how big.

    ``levels`` are the average weight bit-widths compared head to head (an integer
    ``b`` means "MixQuant at the same average as uniform ``b``"; ``b + 0.5``
    means "MixQuant half-way between uniform ``b`` and ``b + 1``").
    """

    name: str
    title: str
    build_model: Callable[[], nn.Module]
    load_eval: Callable[["Scale"], EvalData]
    load_calib: Callable[["Scale", int], torch.Tensor]
    levels: List[float]
    pareto_bits: List[int]  # uniform bit-widths on the Pareto plot (MixQuant at their averages and mid-points)
    per_tensor_levels: List[float]
    free_levels: List[float]  # levels of the "every layer free" study (no pinned first/last layer)
    brecq_levels: List[float]
    brecq_act_bits: int
    brecq_options: Dict[str, object]
    brecq_act_seeds: Optional[int]  # seeds for the BRECQ + activations cells (None: all requested)
    qem_values: List[float]
    primary: str  # main metric for plots: "top1" or "agree"
    candidates: List[int] = field(default_factory=lambda: list(range(2, 9)))  # MixQuant's candidate bit-widths
    objective_free: bool = True  # also compare objectives with every layer free
    calib_description: str = ""
    eval_description: str = ""
    batch_size: int = 250


# --------------------------------------------------------------------------
# MobileNetV2 on real photos
# --------------------------------------------------------------------------


def _mnv2_eval(scale: Scale) -> EvalData:
    from .. import zoo

    photos = zoo.imagenet_photos()
    if scale.photos is not None:
        photos = photos[: scale.photos]
    size = scale.image_size
    views = [zoo.imagenet_crops(img, n=scale.crops, mode="grid", resize=round(size * 256 / 224), size=size)
             for img, _, _ in photos]
    x = torch.cat(views)
    y = torch.tensor([label for _, label, _ in photos]).repeat_interleave(scale.crops)
    center = torch.arange(len(photos)) * scale.crops  # grid view 0 is the centre crop
    desc = (f"{len(photos)} labelled ImageNet photos (foolbox) x {scale.crops} grid views "
            f"(resize {round(size * 256 / 224)}, five {size} crops{' + mirrors' if scale.crops > 5 else ''}) "
            f"= {x.shape[0]} images")
    return EvalData(x, y, center, desc)


def _mnv2_calib(scale: Scale, seed: int) -> torch.Tensor:
    from .. import zoo

    photos = zoo.unlabelled_photos()
    per = -(-scale.calib // len(photos))
    views = [zoo.imagenet_crops(img, n=per, mode="random", seed=1000 * seed + i, size=scale.image_size)
             for i, (img, _) in enumerate(photos)]
    # interleave so that any prefix covers every photo
    x = torch.stack(views, 1).reshape(-1, *views[0].shape[1:])
    return x[: scale.calib].contiguous()


def _mobilenet_v2(scale: Scale) -> Setup:
    from .. import zoo

    return Setup(
        name="mobilenet_v2",
        title="MobileNetV2 (torchvision ImageNet weights) on real photos",
        build_model=zoo.mobilenet_v2,
        load_eval=_mnv2_eval,
        load_calib=_mnv2_calib,
        levels=[3, 4],
        pareto_bits=[3, 4, 5],
        per_tensor_levels=[4, 6],
        free_levels=[3, 4],
        brecq_levels=[3],
        brecq_act_bits=8,
        brecq_options={"iters": 40, "batch_size": 8, "num_samples": 32, "act_iters": 20, "num_threads": None},
        brecq_act_seeds=1,
        qem_values=[64.0, 256.0, 1024.0],
        primary="agree",
        calib_description="random-resized crops (35-100 % of the area, random mirror) of the 7 natural photos "
        "shipped by scikit-image (astronaut, chelsea, coffee, two motorcycles, rocket, Hubble deep field); "
        "none of them is an evaluation photo",
        eval_description="the 20 labelled ImageNet photos shipped by foolbox, five views each",
        batch_size=50,
    )


# --------------------------------------------------------------------------
# ResNet-20 on Fashion-MNIST
# --------------------------------------------------------------------------


def _test_split(loader: str, normalize: str, label: str) -> Callable[[Scale], EvalData]:
    """Evaluation data: the test split of a zoo data set (``zoo.<loader>``), normalised."""

    def load(scale: Scale) -> EvalData:
        from .. import zoo

        x, y = getattr(zoo, loader)("test")
        if scale.eval_limit is not None:
            x, y = x[: scale.eval_limit], y[: scale.eval_limit]
        return EvalData(getattr(zoo, normalize)(x), y, None, f"{label} test set, {x.shape[0]} images")

    return load


def _train_draw(loader: str, normalize: str) -> Callable[[Scale, int], torch.Tensor]:
    """Calibration data: a seeded random draw from the training split, normalised."""

    def load(scale: Scale, seed: int) -> torch.Tensor:
        from .. import zoo

        x, _ = getattr(zoo, loader)("train")
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[: scale.calib]
        return getattr(zoo, normalize)(x[idx])

    return load


_fmnist_eval = _test_split("fashion_mnist", "fashion_mnist_normalize", "Fashion-MNIST")
_fmnist_calib = _train_draw("fashion_mnist", "fashion_mnist_normalize")


def _resnet20(scale: Scale) -> Setup:
    from .. import zoo

    return Setup(
        name="resnet20",
        title="ResNet-20 on Fashion-MNIST (checkpoint trained by scripts/train_resnet20.py)",
        build_model=zoo.resnet20,
        load_eval=_fmnist_eval,
        load_calib=_fmnist_calib,
        levels=[2.5, 3],
        pareto_bits=[2, 3],
        per_tensor_levels=[3],
        free_levels=[2.5, 3],
        brecq_levels=[2.5],
        brecq_act_bits=4,
        brecq_options={"iters": 100, "batch_size": 32, "num_samples": 128, "act_iters": 50, "num_threads": None},
        brecq_act_seeds=1,
        qem_values=[1024.0, 4096.0, 16384.0],
        primary="top1",
        objective_free=False,
        calib_description="images drawn at random (seeded) from the 60k Fashion-MNIST training images",
        eval_description="the full Fashion-MNIST test set (10,000 images)",
        batch_size=500,
    )


# --------------------------------------------------------------------------
# MNIST CNNs
# --------------------------------------------------------------------------


_mnist_eval = _test_split("mnist", "mnist_normalize", "MNIST")
_mnist_calib = _train_draw("mnist", "mnist_normalize")


def _mnist(name: str, title: str, factory: Callable[[], nn.Module]) -> Callable[[Scale], Setup]:
    def make(scale: Scale) -> Setup:
        return Setup(
            name=name,
            title=title,
            build_model=factory,
            load_eval=_mnist_eval,
            load_calib=_mnist_calib,
            levels=[2.5, 3],
            pareto_bits=[2, 3, 4],
            per_tensor_levels=[2.5, 3],
            free_levels=[2.5, 3],
            brecq_levels=[2.5],
            brecq_act_bits=4,
            brecq_options={"iters": 100, "batch_size": 32, "num_samples": 128, "act_iters": 50, "num_threads": None},
            brecq_act_seeds=None,
            qem_values=[1024.0, 4096.0, 16384.0, 65536.0],
            primary="top1",
            calib_description="images drawn at random (seeded) from MNIST's 50k training split",
            eval_description="the MNIST test set (10,000 images)",
            batch_size=1000,
        )

    return make


def _builders() -> Dict[str, Callable[[Scale], Setup]]:
    from .. import zoo

    return {
        "mobilenet_v2": _mobilenet_v2,
        "resnet20": _resnet20,
        "mnist_ccexam": _mnist("mnist_ccexam", "MNIST CNN (ccexam checkpoint, 2 conv + 2 fc)", zoo.mnist_cnn_ccexam),
        "mnist_digit": _mnist("mnist_digit", "MNIST CNN (digit-recognizer checkpoint, 3 conv + 2 fc)",
                              zoo.mnist_cnn_digit),
    }




def build_setup(name: str, scale: Scale) -> Setup:
    """The :class:`Setup` called ``name`` (one of :data:`SETUP_NAMES`) at ``scale``."""
    builders = _builders()
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(SETUP_NAMES)}")
    return builders[name](scale)
