"""ImageNet ResNet-18 / ResNet-50 definitions for benchmarks (kaiming-normal weights, no download)."""

from __future__ import annotations

import torch
import torch.nn as nn


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> list:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, width, 3, stride), nn.ReLU(), *_conv_bn(width, width, 3))
        self.short = nn.Sequential(*_conv_bn(cin, width, 1, stride)) if stride != 1 or cin != width else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.body = nn.Sequential(*_conv_bn(cin, width, 1), nn.ReLU(), *_conv_bn(width, width, 3, stride), nn.ReLU(),
                                  *_conv_bn(width, cout, 1))
        self.short = nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


def _resnet(block, depths, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers, cin = [*_conv_bn(3, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)], 64
    for stage, (width, depth) in enumerate(zip((64, 128, 256, 512), depths)):
        for i in range(depth):
            layers.append(block(cin, width, 2 if i == 0 and stage > 0 else 1))
            cin = width * block.expansion
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000))
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
    return model.eval()


def resnet18(seed: int = 0) -> nn.Module:
    """ResNet-18 shapes: 21 quantizable layers, 11.7 M weights."""
    return _resnet(Basic, (2, 2, 2, 2), seed)


def resnet50(seed: int = 0) -> nn.Module:
    """ResNet-50 shapes: 54 quantizable layers, 25.5 M weights."""
    return _resnet(Bottleneck, (3, 4, 6, 3), seed)
