"""BRECQ: AdaRound pieces, block reconstruction, Fisher loss, activations, determinism, limits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from _quant_models import Odd, images, tiny_mobilenet, tiny_resnet

import mixquant
from mixquant.methods import BrecqReport, register_block
from mixquant.methods.adaround import GAMMA, ZETA, AdaRound, LinearTempDecay
from mixquant.nn.qmodules import ActQuantizer
from mixquant.api.quantize import quantize

# Small blocks are overhead-bound: one thread is fastest, and on a shared machine much faster.
FAST = {"num_threads": 1, "progress": False, "batch_size": 16}


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _codes(layer: nn.Module) -> torch.Tensor:
    w, ch = layer.weight.detach(), layer.mixquant_ch_axis
    shape = [1] * w.dim()
    shape[ch] = -1
    s = layer.weight_scale.reshape(shape if layer.weight_scale.numel() > 1 else [1] * w.dim())
    q = w / s + layer.weight_zero_point.reshape(s.shape).float()
    assert torch.allclose(q, torch.round(q), atol=1e-3), "weight off its grid"
    q = torch.round(q)
    assert q.min() >= 0 and q.max() <= 2**layer.mixquant_bits - 1
    return q


# -- AdaRound building blocks ----------------------------------------------------


def test_adaround_init_schedule_and_hard_codes():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3)
    scale = w.abs().amax(dim=(1, 2, 3)) / 3.5
    zp = torch.full((4,), 4, dtype=torch.int32)
    r = AdaRound(w, scale, zp, 3, 0)
    s = scale.reshape(-1, 1, 1, 1)
    frac = w / s - torch.floor(w / s)
    assert torch.allclose(r.h(), frac, atol=1e-5)  # h(V) = frac(w / scale)
    inside = ((torch.floor(w / s) + 4 >= 0) & (torch.floor(w / s) + 5 <= 7))
    assert torch.allclose(r()[inside], w[inside], atol=1e-5)  # soft weight = float weight inside the range
    r.mode = "hard"
    codes = r.codes("hard")
    assert codes.min() >= 0 and codes.max() <= 7
    assert torch.equal(r(), (codes.float() - 4) * s)
    with torch.no_grad():
        r.V.copy_(torch.where(r.V >= 0, 10.0, -10.0))
    assert float(r.regularizer(2.0).detach()) == 0.0 and r.hard_fraction() == 1.0
    assert (GAMMA, ZETA) == (-0.1, 1.1)
    sched = LinearTempDecay(100, 0.2, 20, 2)
    assert sched.in_warmup(19) and not sched.in_warmup(20)
    assert sched(0) == 20 and sched(20) == 20 and sched(60) == pytest.approx(11) and sched(100) == 2


# -- reconstruction ----------------------------------------------------------------


def test_brecq_beats_round_to_nearest_and_rounds_hard():
    model = tiny_resnet()
    x = images(64)
    # First and last layer pinned in the config, as BRECQ's code does it (the method never raises bits itself).
    cfg = mixquant.uniform(model, 3, errors=False, keep=mixquant.keep_first_last(model, x[:1]))
    # A few hundred iterations instead of 20,000: a larger step lets the rounding variables settle.
    q = quantize(model, cfg, "brecq", calib_data=x, iters=600, lr=1e-2, **FAST)
    report = q.mixquant_report
    assert isinstance(report, BrecqReport)
    blocks = [r for r in report.records if r.kind == "block"]
    assert [r.unit for r in blocks] == ["layer1.0", "layer1.1"]
    before = sum(r.loss_before for r in blocks)
    after = sum(r.loss_after for r in blocks)
    assert after < 0.85 * before, report.table()
    for r in report.records:
        assert math.isfinite(r.loss_after) and r.loss_after <= 1.05 * r.loss_before + 1e-6
        assert r.hard_fraction is not None and r.hard_fraction > 0.7
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())  # folded first
    applied = q.mixquant_state.config.bits
    assert applied == cfg.bits and applied["conv1"] == 8 and applied["fc"] == 8
    for name, bits in applied.items():
        layer = q.get_submodule(name)
        assert layer.mixquant_bits == bits and "adaround" not in layer._modules
        assert isinstance(layer.weight, nn.Parameter)
        _codes(layer)  # every weight hard-rounded onto its grid
    with torch.no_grad():
        assert (q(x) - model(x)).abs().mean() < 0.5 * model(x).abs().mean()


def test_mixed_bits_inside_reconstruction_and_determinism():
    model = tiny_resnet()
    x = images(32)
    keep = {"layer1.0.conv1": 3, "layer1.0.conv2": 5, "layer1.1.conv2": 2, "fc": 6}
    cfg = mixquant.uniform(model, 4, keep=keep, errors=False)
    opts = dict(calib_data=x, iters=40, keep_first_last_8bit=False, seed=3, **FAST)
    q1 = quantize(model, cfg, "brecq", **opts)
    q2 = quantize(model, cfg, "brecq", **opts)
    assert q1.mixquant_state.config.bits == cfg.bits
    for name, bits in cfg.bits.items():
        codes = _codes(q1.get_submodule(name))
        for c in range(codes.shape[0]):
            assert codes[c].unique().numel() <= 2**bits
    a, b = _state(q1), _state(q2)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same machine: identical


def test_mobilenet_blocks_and_unknown_architecture():
    mob = tiny_mobilenet()
    q = quantize(mob, mixquant.uniform(mob, 4, errors=False), "brecq", calib_data=images(32, 16), iters=20, **FAST)
    units = [(r.unit, r.kind) for r in q.mixquant_report.records]
    assert units == [("features.0.0", "layer"), ("features.1", "block"), ("features.2", "block"), ("classifier", "layer")]
    odd = Odd().eval()
    q = quantize(odd, mixquant.uniform(odd, 4, errors=False), "brecq", calib_data=images(16), iters=20, **FAST)
    assert [(r.unit, r.kind) for r in q.mixquant_report.records] == [("a", "layer"), ("b", "layer"), ("head", "layer")]


def test_block_with_tuple_output_falls_back_to_layers():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 3, 1)
            self.b = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))) + x, x

    register_block(Pair)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.pair(x)[0].mean((2, 3)))

    net = Net().eval()
    q = quantize(net, mixquant.uniform(net, 4, errors=False), "brecq", calib_data=images(16), iters=10, **FAST)
    assert [(r.unit, r.kind) for r in q.mixquant_report.records] == [
        ("pair.a", "layer"), ("pair.b", "layer"), ("fc", "layer")]


@pytest.mark.parametrize("labels", [True, False])
def test_fisher_loss(labels):
    model = tiny_resnet()
    x = images(32)
    calib = [(x, torch.randint(0, 10, (32,)))] if labels else x
    q = quantize(model, mixquant.uniform(model, 3, errors=False), "brecq", calib_data=calib, loss="fisher",
                 iters=30, **FAST)
    assert all(math.isfinite(r.loss_after) for r in q.mixquant_report.records)
    if labels:
        with pytest.raises(ValueError, match="class indices"):
            quantize(model, mixquant.uniform(model, 3, errors=False), "brecq", loss="fisher", iters=1,
                     calib_data=[(x, torch.full((32,), 99))], **FAST)


def test_activation_step_sizes_learned():
    model = tiny_resnet()
    x = images(32)
    q = quantize(model, mixquant.uniform(model, 4, errors=False), "brecq", calib_data=x, act_bits=4,
                 iters=20, act_iters=60, act_lr=1e-3, **FAST)
    state = q.mixquant_state
    assert set(state.output_act_bits) == {"layer1.0", "layer1.1"}  # after the residual add
    assert state.input_act_bits["conv1"] == 8 and state.input_act_bits["fc"] == 8
    assert state.input_act_bits["layer1.0.conv2"] == 4
    acts = [r for r in q.mixquant_report.records if r.phase == "activations"]
    assert len(acts) == 4 and all(r.iters == 60 for r in acts)
    assert sum(r.loss_after for r in acts) < sum(r.loss_before for r in acts)
    for m in q.modules():
        if isinstance(m, ActQuantizer):
            assert m.mode == "quant" and not m.scale.requires_grad and float(m.scale) > 0
    assert all(p.requires_grad for p in q.parameters() if not isinstance(p, torch.Tensor) or p.dim() > 0)


def test_cache_limit_and_device_option():
    model = tiny_resnet()
    before = _state(model)
    cfg = mixquant.uniform(model, 4, errors=False)
    with pytest.raises(ValueError, match="max_cache_mb"):
        quantize(model, cfg, "brecq", calib_data=images(32), iters=5, max_cache_mb=0.001, **FAST)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    q = quantize(model, cfg, "brecq", calib_data=images(16), iters=5, device="cpu", **FAST)
    assert all(p.device.type == "cpu" for p in q.parameters())
    assert q.mixquant_report.peak_cache_bytes == 16 * 8 * 8 * 8 * 4 * 2  # largest unit: in + out, float32
