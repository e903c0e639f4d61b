"""The README's rule of thumb for QEM: the error grows by the squared step-size ratio per bit removed."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import mixquant


def _gaussian_net() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(256, 256) for _ in range(6)] + [nn.Conv2d(32, 64, 3) for _ in range(4)]
    return nn.ModuleList(layers)


def _threshold(ref_bits: int, bits: int) -> float:
    """Error at ``bits`` over the error at ``ref_bits``, for weights spread over their range: the squared step ratio."""
    return ((2**ref_bits - 1) / (2**bits - 1)) ** 2


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_qem_four_to_the_k_stops_one_bit_short(k):
    model = _gaussian_net()
    at_power = mixquant.search(model, qem=4.0**k)  # just below the step-ratio threshold of ref_bits - k
    assert set(at_power.bits.values()) == {8 - k + 1}, at_power.bits
    past = mixquant.search(model, qem=1.05 * _threshold(8, 8 - k))
    assert set(past.bits.values()) == {8 - k}, past.bits
    below = mixquant.search(model, qem=0.97 * _threshold(8, 8 - k))
    assert set(below.bits.values()) == {8 - k + 1}, below.bits


def test_threshold_values_quoted_in_the_readme():
    assert [round(_threshold(8, b), 1) for b in (7, 6, 5, 4, 3)] == [4.0, 16.4, 67.7, 289.0, 1327.0]
