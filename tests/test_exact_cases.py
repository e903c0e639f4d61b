"""Exact cases that one-line bugs cannot survive.

Each test here was written against a mutation that passed the rest of the
suite: the QEM rule's ``<=`` as ``<``, the model-wide reference's median as a
mean, BN folding without ``eps``, the error sum kept in float across blocks,
and a wrong channel axis for a quantizable type. Tolerance tests cannot see
these bugs; equality on cases built to be exact can.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import mixquant
from mixquant.nn.layers import channel_axis

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ----------------------------------------------------------------- QEM rule --
def test_qem_one_keeps_the_reference_bits():
    # err(b) <= qem * err(ref): at qem = 1 the reference bit-width itself qualifies, and fewer bits
    # (more error) do not. With "<" every layer would take 5 bits instead of 4.
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16))
    config = mixquant.search(model, bits=range(2, 9), qem=1.0, ref_bits=4)
    assert set(config.bits.values()) == {4}


def test_qem_all_zero_layer_takes_the_fewest_bits():
    # An all-zero layer has zero error at every bit-width: 0 <= qem * 0 holds from the first candidate.
    # With "<" nothing qualifies and the rule falls back to the largest candidate (8).
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight.zero_()
    config = mixquant.search(model, bits=range(2, 9), qem=4.0)
    assert config.bits["0"] == 2 and config.bits["1"] > 2


def _chosen(config, qem, ref):
    out = {}
    for name in config.bits:
        t = config.errors[name]
        ok = [b for b, e in zip(t["bits"], t["norm"]) if b in config.candidates and e <= qem * ref]
        out[name] = ok[0] if ok else config.candidates[-1]
    return out


def test_model_reference_is_the_median_not_the_mean():
    # Three all-zero layers (normalised error 0) and two ordinary ones: the median of the normalised
    # errors at ref_bits is 0, their mean is not. With the median no bit-width of an ordinary layer
    # qualifies (it takes the largest, 8); with the mean it would take fewer bits.
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(5)])
    with torch.no_grad():
        for i in (0, 2, 3):
            model[i].weight.zero_()
    config = mixquant.search(model, bits=range(2, 9), qem=64.0, ref_bits=8, qem_reference="model")
    refs = [config.errors[n]["norm"][config.errors[n]["bits"].index(8)] for n in config.bits]
    by_median, by_mean = _chosen(config, 64.0, float(np.median(refs))), _chosen(config, 64.0, float(np.mean(refs)))
    assert by_median == {"0": 2, "1": 8, "2": 2, "3": 2, "4": 8} and by_mean["1"] < 8  # the case separates them
    assert config.bits == by_median


# ------------------------------------------------------------ error sums ----
def _exact_row():
    """One channel whose errors are exact: scale 1, zero point 0 (range [0, 255] at 8 bits).

    One chunk of the core's work (32768 elements): 4096 values 0.5 (round half to even -> 0,
    error 2**-2) filling the first cache blocks of every SIMD width, then 28670 values 2**-20
    (error 2**-40 each) and the two range ends (error 0). In double the sum is exact,
    1024 + 28670 * 2**-40; a running total kept in float loses every later block
    (a float next to 1024 has an ulp of 2**-13, a block of 2**-40 terms sums to at most 2**-28).
    """
    row = torch.cat([torch.full((4096,), 0.5), torch.full((28670,), 2.0**-20), torch.tensor([255.0, 0.0])])
    return row, 4096 * 0.25 + 28670 * 2.0**-40


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("copies", [1, 3])
def test_error_sum_is_exact_across_blocks(simd, per_channel, copies):
    row, expected = _exact_row()
    w = row.repeat(copies, 1)  # several channels (per channel), or several chunks of one group (per tensor)
    for backend in ("native", "reference"):
        err = mixquant.roundoff_error(w, bits=[8], per_channel=per_channel, backend=backend, num_threads=2)
        assert float(err.scale.reshape(-1)[0]) == 1.0 and int(err.zero_point.reshape(-1)[0]) == 0
        assert float(err.sse[0]) == copies * expected, (backend, simd, float(err.sse[0]) - copies * expected)
        if per_channel:
            assert err.channel_sse.reshape(-1).tolist() == [expected] * copies


# ------------------------------------------------------------ BN folding ----
_FOLDABLE = [
    (lambda: nn.Linear(6, 5), nn.BatchNorm1d, (4, 6)),
    (lambda: nn.Conv1d(3, 5, 3), nn.BatchNorm1d, (2, 3, 9)),
    (lambda: nn.Conv2d(3, 5, 3), nn.BatchNorm2d, (2, 3, 7, 7)),
    (lambda: nn.Conv3d(3, 5, 3), nn.BatchNorm3d, (2, 3, 5, 5, 5)),
    (lambda: nn.ConvTranspose1d(3, 5, 3), nn.BatchNorm1d, (2, 3, 9)),
    (lambda: nn.ConvTranspose2d(3, 5, 3), nn.BatchNorm2d, (2, 3, 6, 6)),
    (lambda: nn.ConvTranspose3d(3, 5, 3), nn.BatchNorm3d, (2, 3, 4, 4, 4)),
]
_IDS = ["Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"]


@pytest.mark.parametrize("make, bn_cls, shape", _FOLDABLE, ids=_IDS)
def test_fold_matches_the_closed_form_with_dead_channels(make, bn_cls, shape):
    # Real nets have dead channels with running_var near 1e-8: without eps the factor would be 1e4, not ~316.
    torch.manual_seed(0)
    layer, bn = make(), bn_cls(5, eps=1e-5)
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([1e-8, 0.0, 0.5, 2.0, 1e-6]))
        bn.running_mean.uniform_(-1, 1)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    model = nn.Sequential(layer, bn).eval()
    w0, b0 = layer.weight.detach().double().clone(), layer.bias.detach().double().clone()
    factor = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    axis = 1 if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
    view = [1] * w0.dim()
    view[axis] = -1
    want_w = (w0 * factor.reshape(view)).float()
    want_b = ((b0 - bn.running_mean.double()) * factor + bn.bias.double()).float()
    x = torch.randn(*shape)
    with torch.no_grad():
        expect = model(x)
        folded = mixquant.fold_bn(model)
        assert torch.equal(folded[0].weight, want_w) and torch.equal(folded[0].bias, want_b)
        assert isinstance(folded[1], nn.Identity)
        assert torch.allclose(folded(x), expect, rtol=1e-4, atol=1e-4 * float(expect.abs().max()))


# ------------------------------------------------------------ channel axis --
_QUANTIZABLE = [
    lambda: nn.Linear(6, 5), lambda: nn.Conv1d(3, 5, 2), lambda: nn.Conv2d(3, 5, 2), lambda: nn.Conv3d(3, 5, 2),
    lambda: nn.ConvTranspose1d(3, 5, 2), lambda: nn.ConvTranspose2d(3, 5, 2), lambda: nn.ConvTranspose3d(3, 5, 2),
]


@pytest.mark.parametrize("make", _QUANTIZABLE, ids=_IDS)
def test_per_channel_scales_follow_the_output_channels(make):
    # The output-channel axis is found here from the module's own sizes (5 outputs, 3 or 6 inputs,
    # kernel 2), not from mixquant's table: a wrong table entry gives scales along the wrong axis.
    layer = make()
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    axis = [d for d, n in enumerate(layer.weight.shape) if n == out]
    assert len(axis) == 1
    axis = axis[0]
    assert channel_axis(layer) == axis
    with torch.no_grad():  # output channel c spans [-(c+1), c+1] exactly
        moved = layer.weight.movedim(axis, 0).shape
        rows = torch.rand(out, int(np.prod(moved[1:]))) - 0.5
        rows[:, 0], rows[:, 1] = -1.0, 1.0
        rows *= torch.arange(1, out + 1, dtype=torch.float32)[:, None]
        layer.weight.copy_(rows.reshape(moved).movedim(0, axis))
    model = nn.Sequential(layer)
    config = mixquant.uniform(model, 4)
    assert config.groups["0"] == out
    q = mixquant.quantize(model, config, progress=False)
    expected = torch.tensor([2.0 * (c + 1) / 15 for c in range(out)], dtype=torch.float32)
    assert torch.allclose(q[0].weight_scale, expected, rtol=1e-6)
