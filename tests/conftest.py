"""Shared fixtures: small models and the list of SIMD levels to run native kernels on."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import mixquant


class SmallNet(nn.Module):
    """A conv + linear net with layers of different sizes and sensitivities."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 1)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = nn.functional.avg_pool2d(torch.relu(self.conv2(x)), 2)
        x = nn.functional.avg_pool2d(torch.relu(self.conv3(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def make_small_net(seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    net = SmallNet()
    with torch.no_grad():  # give layers different ranges so the search has something to choose
        net.conv1.weight.mul_(3.0)
        net.fc1.weight[0].mul_(40.0)
    return net.eval()


@pytest.fixture
def small_net() -> SmallNet:
    return make_small_net()


def simd_levels() -> list:
    # An unbuilt core yields no levels here; test_api.py fails loudly on it instead.
    try:
        return mixquant.supported_simd_levels()
    except ImportError:
        return []


@pytest.fixture(params=simd_levels())
def simd(request):
    """Run the test once per SIMD level this machine supports."""
    with mixquant.use_simd_level(request.param):
        yield request.param
