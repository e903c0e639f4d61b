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
from mixquant.nn.fold import fold_bn
from mixquant.methods.cache import rec_loss

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


# -- the reference's loss, never worse than the start --------------------------------


def test_rounding_ends_binary_and_hard_loss_close_to_soft():
    # Under BRECQ's reduction (sum over channels, mean over samples and positions)
    # lambda = 0.01 is strong enough that the soft rounding ends binary, so hard
    # rounding loses little. With a per-sample sum over C x H x W the regulariser is
    # H x W times weaker: here layer1.0 ended at 2.9x its soft loss and 88 % binary.
    model = tiny_resnet()
    x = images(64)
    # First and last layer at 8 bits (the setting this was measured in; the 3-channel stem at 3 bits ends 92 % binary).
    cfg = mixquant.uniform(model, 3, errors=False, keep=mixquant.keep_first_last(model, x[:1]))
    q = quantize(model, cfg, "brecq", calib_data=x, iters=300, lr=3e-2, never_worse=False, **FAST)
    for r in q.mixquant_report.records:
        assert r.loss_rounded <= 1.3 * r.loss_soft + 1e-9, q.mixquant_report.table()
        assert r.hard_fraction >= 0.96, q.mixquant_report.table()
        assert r.kept == "adaround" and r.loss_after == r.loss_rounded


def test_rec_loss_reduction():
    from mixquant.methods.cache import rec_loss

    pred, target = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    pred[0, 1, 2, 3] = 2.0  # one error of 4 among 2 x 4 x 4 (sample, position) pairs
    pred[1, 2, 0, 0] = 1.0  # and one of 1 in another channel
    assert float(rec_loss(pred, target)) == 5.0 / 32
    w = torch.full_like(pred, 4.0)
    assert float(rec_loss(pred, target, w)) == 20.0 / 32  # Fisher weights multiply before the sum
    lin, lin_t = torch.zeros(2, 4, 3), torch.zeros(2, 4, 3)
    lin[1, 0, :] = 1.0  # a [N, T, C] linear output: sum over C (last), mean over N x T
    assert float(rec_loss(lin, lin_t, channel_dim=-1)) == 3.0 / 8
    assert float(rec_loss(torch.ones(4), torch.zeros(4))) == 1.0


def test_never_worse_keeps_round_to_nearest():
    model = tiny_resnet()
    cfg = mixquant.uniform(model, 3, errors=False)
    x = images(32)
    # A huge step throws the rounding variables about: the learned rounding ends worse than nearest.
    opts = dict(calib_data=x, iters=30, lr=5.0, warmup=0.0, **FAST)
    kept = quantize(model, cfg, "brecq", **opts)
    raw = quantize(model, cfg, "brecq", never_worse=False, **opts)
    worse = [r for r in raw.mixquant_report.records if r.loss_rounded > r.loss_before]
    assert worse, raw.mixquant_report.table()
    for r in worse:
        assert r.kept == "adaround" and r.loss_after == r.loss_rounded
    nearest = [r for r in kept.mixquant_report.records if r.kept == "nearest"]
    assert nearest, kept.mixquant_report.table()
    for r in kept.mixquant_report.records:
        assert r.loss_after <= r.loss_before
        assert r.loss_after == (r.loss_before if r.kept == "nearest" else r.loss_rounded)
        assert r.kept == ("nearest" if r.loss_rounded > r.loss_before else "adaround")
    table = kept.mixquant_report.table()
    assert "nearest" in table and "kept" in table
    # A unit that kept round-to-nearest holds exactly the nearest codes of the folded weights on its grid.
    folded = fold_bn(model)
    for r in nearest:
        for name in r.layers:
            layer, w = kept.get_submodule(name), folded.get_submodule(name).weight.detach()
            s_ = layer.weight_scale.reshape(-1, *([1] * (w.dim() - 1)))
            z = layer.weight_zero_point.reshape(s_.shape).float()
            expect = torch.clamp(torch.round(w / s_) + z, 0, 2**layer.mixquant_bits - 1)
            assert torch.equal(_codes(layer), expect)


def test_never_worse_keeps_min_max_step_sizes():
    model = tiny_resnet()
    cfg = mixquant.uniform(model, 4, errors=False)
    x = images(32)
    opts = dict(calib_data=x, act_bits=4, iters=5, act_iters=20, act_lr=50.0, **FAST)
    kept = quantize(model, cfg, "brecq", **opts)
    raw = quantize(model, cfg, "brecq", never_worse=False, **opts)
    acts = [r for r in raw.mixquant_report.records if r.phase == "activations"]
    assert any(r.loss_rounded > r.loss_before for r in acts), raw.mixquant_report.table()
    for r in kept.mixquant_report.records:
        if r.phase == "activations":
            assert r.loss_after <= r.loss_before
            assert r.kept == ("min/max" if r.loss_rounded > r.loss_before else "learned")


def test_refresh_every_tenth_of_a_unit():
    from mixquant.methods.brecq import refresh_every

    assert [refresh_every(n) for n in (5, 25, 100, 500, 20000)] == [1, 2, 10, 50, 50]


def _cache_peaks(*cases: str) -> dict:
    import json
    import os
    import subprocess
    import sys

    here = os.path.dirname(__file__)
    run = lambda names: subprocess.run(  # noqa: E731
        [sys.executable, os.path.join(here, "_cache_peak.py"), *names], capture_output=True, text=True, check=True,
        timeout=300).stdout.splitlines()
    rows = [json.loads(line) for line in run(cases)]
    if not all(r["reset"] for r in rows):  # no /proc/self/clear_refs: one process per case
        rows = [json.loads(run([c])[-1]) for c in cases]
    return {r["case"]: r for r in rows}


def test_cache_limit_holds_the_process_peak():
    # The limit is checked before the cache is allocated, on the cache plus one step's measured
    # working set, and the cache is filled in place: the process's extra peak stays within 10 %
    # of max_cache_mb (before: 1.6x, and 2.3x with Fisher weights), and a refused unit costs
    # nothing (before: its whole input cache was gathered first).
    peaks = _cache_peaks("fits", "fits_fisher", "refused")
    for name in ("fits", "fits_fisher"):
        r = peaks[name]
        assert r["error"] is None and r["cache"] > 0.75 * r["limit"], r
        assert r["extra_peak"] <= 1.1 * r["limit"], r
    r = peaks["refused"]
    assert "max_cache_mb=110" in r["error"] and "unit a needs 118.8 MB" in r["error"], r
    # Before, the refused unit's whole input cache (118.8 MB) was gathered first. What remains
    # (10-21 MB measured) is the quantized copy and the calibration batches, which vary with the
    # allocator's state: the bound sits well below one cache and above that noise.
    assert r["extra_peak"] < 0.25 * r["limit"], r


# -- the fused step against a straightforward iteration --------------------------------


def _unit_setup(seed: int = 0):
    from mixquant.methods.adaround import attach
    from mixquant.methods.cache import UnitData, capture_inputs, capture_targets, probe_unit

    folded = fold_bn(tiny_resnet(seed)).eval()
    folded.requires_grad_(False)
    x = images(32)
    block = folded.get_submodule("layer1.1")  # a BasicBlock with a downsampling 1x1 convolution
    cpu = torch.device("cpu")
    shape = probe_unit(folded, block, x, 16, cpu)
    data = UnitData(capture_inputs(folded, block, x, 16, cpu, shape), *capture_targets(folded, block, x, 16, cpu, shape))
    roundings = []
    for name in ("conv1", "conv2", "downsample.0"):
        layer = block.get_submodule(name)
        w = layer.weight.detach()
        s = w.abs().amax(dim=(1, 2, 3)) / 1.5
        r = AdaRound(w, s, torch.full((w.shape[0],), 2, dtype=torch.int32), 2, 0)
        attach(layer, r)
        roundings.append(r)
    return block, data, roundings


def _straightforward_step(block, data, roundings, opts, generator):
    """One BRECQ iteration as autograd and torch.optim.Adam compute it: the reference for make_step."""
    opt = torch.optim.Adam([r.V for r in roundings], lr=opts.lr)
    sched = LinearTempDecay(opts.iters, opts.warmup, *opts.beta_range)

    def step(it):
        idx = torch.randperm(len(data), generator=generator)[: opts.batch_size]
        x, y, w = data.batch(idx)
        rec = loss = rec_loss(block(x), y, w, data.channel_dim)
        if not sched.in_warmup(it):
            loss = loss + opts.rounding_weight * sum(r.regularizer(sched(it)) for r in roundings)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return rec.detach()

    return step


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_fused_step_equals_straightforward_iteration(backend):
    from mixquant.methods.brecq import BrecqOptions, make_step

    opts = BrecqOptions(iters=24, batch_size=16, lr=2e-2, warmup=0.25, rounding_weight=0.05)
    b1, d1, r1 = _unit_setup()
    b2, d2, r2 = _unit_setup()
    for r in r1 + r2:
        r.mode = "soft"
    plain = _straightforward_step(b1, d1, r1, opts, torch.Generator().manual_seed(5))
    fused, state = make_step(b2, d2, r2, opts, torch.Generator().manual_seed(5), backend=backend)
    losses = [(plain(it), fused(it)) for it in range(opts.iters)]  # warm-up, then the regulariser
    state.finish()
    codes = [(a.codes("hard"), b.codes("hard")) for a, b in zip(r1, r2)]
    if backend == "reference":  # the same operations: bit for bit
        assert all(torch.equal(a, b) for a, b in losses)
        assert all(torch.equal(a.V, b.V) for a, b in zip(r1, r2))
        assert all(torch.equal(a, b) for a, b in codes)
    else:  # polynomial sigmoid and power: within float rounding
        for a, b in losses:
            assert float(abs(a - b)) <= 1e-4 * float(a) + 1e-7
        for a, b in zip(r1, r2):
            torch.testing.assert_close(b.V, a.V, rtol=1e-4, atol=1e-4)
        same = sum(int((a == b).sum()) for a, b in codes) / sum(a.numel() for a, _ in codes)
        assert same >= 0.995
    moved = sum(int((r.codes("hard") != r.codes("nearest")).sum()) for r in r2)
    assert moved > 0  # the step did change roundings (the comparison is not vacuous)


def test_weight_phase_does_not_depend_on_act_bits():
    # The activation phase runs after the weight phase: the same seed gives the same weights
    # with and without act_bits (benchmarks/brecq_study.py reads both results off one run).
    model = tiny_resnet()
    cfg = mixquant.uniform(model, 3, errors=False)
    opts = dict(calib_data=images(32), iters=25, seed=4, **FAST)
    plain = quantize(model, cfg, "brecq", **opts)
    acts = quantize(model, cfg, "brecq", act_bits=4, act_iters=10, **opts)
    for name in cfg.bits:
        assert torch.equal(plain.get_submodule(name).weight, acts.get_submodule(name).weight)


def test_channels_last_cache_and_fallback():
    from mixquant.methods.cache import probe_unit

    class Viewing(nn.Module):  # .view() refuses a channels-last input: the cache stays NCHW
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            h = self.conv2(torch.relu(self.conv1(x)))
            return (h.view(h.shape[0], -1) * 0.5).view(h.shape)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Viewing()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.block(x).mean((2, 3)))

    net = Net().eval()
    x = images(16)
    cpu = torch.device("cpu")
    assert not probe_unit(net, net.block, x, 8, cpu).channels_last
    folded = fold_bn(tiny_resnet()).eval()
    assert probe_unit(folded, folded.layer1[0], x, 8, cpu).channels_last
    q = quantize(net, mixquant.uniform(net, 4, errors=False), "brecq", calib_data=x, iters=5, **FAST)
    assert [(r.unit, r.kind) for r in q.mixquant_report.records] == [("block", "block"), ("fc", "layer")]


def test_cache_holds_every_sample_in_order_and_counts_the_step():
    from mixquant.methods.cache import CacheShape, capture_inputs, capture_targets, check_cache_size, probe_unit

    folded = fold_bn(tiny_resnet()).eval()
    block = folded.layer1[1]
    x = images(40)  # 40 = 2 full batches of 16 and a partial one
    xs, ys = [], []

    def keep(_m, args, out):
        xs.append(args[0].detach())
        ys.append(out.detach())

    h = block.register_forward_hook(keep)
    with torch.no_grad():
        for i in range(0, 40, 16):  # the same batches as the capture
            folded(x[i:i + 16])
    h.remove()
    seen = {"x": torch.cat(xs), "y": torch.cat(ys)}
    cpu = torch.device("cpu")
    shape = probe_unit(folded, block, x, 16, cpu, fisher=False)
    assert shape.inp == tuple(seen["x"].shape[1:]) and shape.out == tuple(seen["y"].shape[1:])
    inp = capture_inputs(folded, block, x, 16, cpu, shape)
    out, w = capture_targets(folded, block, x, 16, cpu, shape)
    assert w is None and torch.equal(inp, seen["x"]) and torch.equal(out, seen["y"])
    # one step's working set scales with the batch, and counts toward the limit
    assert probe_unit(folded, block, x, 8, cpu).step_bytes < shape.step_bytes
    need = shape.nbytes(40, fisher=False)
    assert need == 40 * (8 * 8 * 8 + 16 * 4 * 4) * 4
    assert check_cache_size(shape, 40, False, need + shape.step_bytes, "u") == need
    with pytest.raises(ValueError, match="for one optimisation step"):
        check_cache_size(shape, 40, False, need + shape.step_bytes - 1, "u")
    assert CacheShape((2,), (3,)).nbytes(10, fisher=True) == 10 * (2 + 3 * 2) * 4
