"""Data-aware sensitivities: each statistic against a direct computation, and the search they drive.

The headline case is a net of two parallel layers where one path is damped by
0.01 before the output: its weights alone look as important as the other's
(or more), the data shows they are not, and every data-aware sensitivity gives
the bits to the path the output feels, at a lower output error than the
data-free rule at the same size.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mixquant
from mixquant.allocation import sensitivity as sens
from mixquant.allocation.bitconfig_file import VERSION
from mixquant.nn.batches import Batch, collect_batches, provenance
from mixquant.nn.replay import PrefixReplay
from _quant_models import tiny_mobilenet, tiny_resnet

DATA = ("input", "output", "fisher", "model")


class TwoPaths(nn.Module):
    """``0.01 * a(x) + b(x)``: a's weights have heavy tails (worse roundoff error), but the output barely feels a."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Linear(64, 16, bias=False)
        self.b = nn.Linear(64, 16, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(16, 64, generator=g) * torch.randn(16, 64, generator=g).exp())
            self.b.weight.uniform_(-1, 1, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.01 * self.a(x) + self.b(x)


def _calib(n: int = 256) -> torch.Tensor:
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(1))


def _output_error(model, config, x) -> float:
    q = mixquant.quantize(model, config, progress=False)
    with torch.no_grad():
        return float(((q(x) - model(x)) ** 2).mean())


@pytest.mark.parametrize("kind", DATA)
def test_the_data_gives_the_bits_to_the_path_the_output_feels(kind):
    model = TwoPaths().eval()
    x = _calib()
    free = mixquant.search(model, avg_bits=4)
    assert free.bits["a"] >= free.bits["b"]  # the weights alone do not see the damping
    data = mixquant.search(model, avg_bits=4, sensitivity=kind, calib_data=x, output_loss="mse")
    assert data.bits["b"] > data.bits["a"]
    assert data.avg_bits <= 4.0 and data.sensitivity == kind
    assert _output_error(model, data, x) < 0.5 * _output_error(model, free, x)


def test_projected_output_error_is_the_squared_first_order_change_per_sample():
    # E_n[(g_n . (W_b - W) x_n)^2], summed over the tokens before squaring: computed by hand.
    torch.manual_seed(4)
    lin = nn.Linear(6, 5, bias=False)
    model = nn.Sequential(lin, nn.Tanh(), nn.Linear(5, 3)).eval()
    x = torch.randn(4, 7, 6)  # 4 samples of 7 tokens
    table = mixquant.roundoff_error(lin.weight, [2, 3], per_channel=True)
    got = sens.measure_sensitivity("output", model, {"0": lin}, {"0": table}, collect_batches(x), output_loss="kl")
    want, diag = [], []
    for wq in sens.candidate_weights(lin, table):
        total = total_diag = 0.0
        for n in range(4):
            h = lin(x[n:n + 1])
            h.retain_grad()
            out = model[2](model[1](h))
            logits = out.reshape(-1, 3)
            F.cross_entropy(logits, logits.detach().argmax(1), reduction="sum").backward()
            dy = torch.nn.functional.linear(x[n:n + 1], wq - lin.weight).detach()
            total += float((h.grad * dy).sum()) ** 2
            total_diag += float((h.grad.square() * dy.square()).sum())
            model.zero_grad()
        want.append(total / 4)
        diag.append(total_diag / 4)
    np.testing.assert_allclose(got.costs["0"], want, rtol=1e-4)
    assert not np.allclose(want, diag, rtol=0.05)  # the coherent sum is not the per-position diagonal


@pytest.mark.parametrize("kind", ["input", "output"])
def test_layer_local_errors_without_the_gain_are_fooled(kind):
    # Without weighting by the output gradient, a's larger local error wins it the bits.
    model = TwoPaths().eval()
    layers = mixquant.find_layers(model)
    tables = {n: mixquant.roundoff_error(m.weight, range(2, 9), per_channel=True) for n, m in layers.items()}
    batches = collect_batches(_calib())
    raw = sens.measure_sensitivity(kind, model, layers, tables, batches, output_loss="mse", scaling="none")
    gain = sens.measure_sensitivity(kind, model, layers, tables, batches, output_loss="mse", scaling="gain")
    assert raw.costs["a"][2] > raw.costs["b"][2]  # at 4 bits
    assert gain.costs["a"][2] < gain.costs["b"][2]


# -- "input": second moments of the input features ---------------------------


def _unfold_moments(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Reference: E_n sum_p of every unfolded patch element squared, laid out like the [C, K] view."""
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        pad = 0
    else:
        pad = conv.padding
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=pad, stride=conv.stride)
    m = cols.double().square().sum(dim=(0, 2)) / x.shape[0]  # [C_in * kh * kw], channel-major
    g = conv.groups
    if g == 1:
        return m
    per_group = m.reshape(g, -1)
    return per_group.repeat_interleave(conv.out_channels // g, dim=0)


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(2, 0), dilation=2),
    dict(kernel_size=3, padding=1, groups=2),
    dict(kernel_size=3, padding=1, groups=6),  # depthwise
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=1),
])
def test_conv_input_moments_are_unfolded_patch_moments(kwargs):
    conv = nn.Conv2d(6, 12, **kwargs)
    x = torch.randn(5, 6, 9, 7, generator=torch.Generator().manual_seed(0)) + 0.5
    got = sens._input_moments_of(conv, x) / x.shape[0]
    torch.testing.assert_close(got.double(), _unfold_moments(conv, x), rtol=1e-5, atol=1e-6)


def test_conv_same_padding_and_conv1d():
    conv = nn.Conv2d(3, 4, 3, padding="same")
    x = torch.randn(2, 3, 6, 6)
    ref = _unfold_moments(nn.Conv2d(3, 4, 3, padding=1), x)
    torch.testing.assert_close((sens._input_moments_of(conv, x) / 2).double(), ref, rtol=1e-5, atol=1e-6)
    c1 = nn.Conv1d(3, 4, 5, stride=2, padding=2)
    x1 = torch.randn(2, 3, 11)
    as2d = nn.Conv2d(3, 4, (1, 5), stride=(1, 2), padding=(0, 2))
    ref1 = _unfold_moments(as2d, x1.unsqueeze(2))
    torch.testing.assert_close((sens._input_moments_of(c1, x1) / 2).double(), ref1, rtol=1e-5, atol=1e-6)


def test_linear_and_transposed_moments():
    lin = nn.Linear(5, 3)
    x = torch.randn(4, 7, 5)  # tokens: summed over positions, averaged over samples
    torch.testing.assert_close(sens._input_moments_of(lin, x) / 4, x.square().sum(dim=(0, 1)) / 4)
    ct = nn.ConvTranspose2d(3, 2, 2)
    xt = torch.randn(2, 3, 4, 4)
    got = sens._input_moments_of(ct, xt)
    per_channel = xt.square().sum(dim=(0, 2, 3))
    torch.testing.assert_close(got, per_channel.repeat_interleave(4))


def test_input_cost_of_a_grouped_conv():
    # Per-row moments ([C_out, K], a depthwise conv's) used to be refused by weighted_errors
    # as a shape mismatch with the [C_out, 1, kh, kw] weight (MobileNetV2 could not be measured).
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, groups=6),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()
    layers = mixquant.find_layers(model)
    tables = {n: mixquant.roundoff_error(m.weight, [3, 5], per_channel=True) for n, m in layers.items()}
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    r = sens.measure_sensitivity("input", model, layers, tables, collect_batches(x), scaling="none")
    dw = model[2]
    with torch.no_grad():
        h = model[1](model[0](x))
    moments = _unfold_moments(dw, h)  # [6, 9], per output channel
    w = dw.weight.detach()
    t = tables["2"]
    fq = mixquant.fake_quantize_tensor(w, torch.from_numpy(t.scale[0]), torch.from_numpy(t.zero_point[0]), 3)
    want = ((w - fq).double().reshape(6, 9) ** 2 * moments).sum()
    assert abs(r.costs["2"][0] - float(want)) <= 1e-4 * float(want)  # index 0: 3 bits


def test_input_cost_is_the_weighted_weight_error():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    layers = mixquant.find_layers(model)
    tables = {n: mixquant.roundoff_error(m.weight, [3, 5], per_channel=True) for n, m in layers.items()}
    x = torch.randn(40, 8)
    r = sens.measure_sensitivity("input", model, layers, tables, collect_batches(x), scaling="none")
    w = model[0].weight.detach()
    t = tables["0"]
    fq = mixquant.fake_quantize_tensor(w, torch.from_numpy(t.scale[0]), torch.from_numpy(t.zero_point[0]), 3)
    want = ((w - fq).double() ** 2 * x.double().square().mean(0)).sum()
    assert r.costs["0"][0] == pytest.approx(float(want), rel=1e-5)


# -- "output" ------------------------------------------------------------------


def test_output_errors_equal_the_direct_computation():
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=True)
    model = nn.Sequential(conv, nn.ReLU(inplace=True)).eval()
    layers = {"0": conv}
    t = mixquant.roundoff_error(conv.weight, [2, 4], per_channel=True)
    x = torch.randn(6, 3, 5, 5)
    errs, energy = sens.output_errors(model, layers, {"0": t}, [Batch((x,))])
    with torch.no_grad():
        y = conv(x)
        for i, b in enumerate(t.bits):
            wq = mixquant.fake_quantize_tensor(conv.weight, torch.from_numpy(t.scale[i]),
                                               torch.from_numpy(t.zero_point[i]), int(b))
            d = F.conv2d(x, wq, conv.bias, padding=1) - y
            torch.testing.assert_close(errs["0"][i], d.double().square().sum(dim=(0, 2, 3)) / 6, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(energy["0"], y.double().square().sum(dim=(0, 2, 3)) / 6, rtol=1e-5, atol=1e-9)


# -- gradients: Fisher and gains -------------------------------------------------


def test_fisher_is_the_mean_of_per_sample_squared_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).eval()
    layers = mixquant.find_layers(model)
    x = torch.randn(5, 4)
    y = torch.tensor([0, 2, 1, 1, 0])
    fisher, _, _ = sens.gradient_stats(model, layers, [Batch((x,), {}, y)], "kl", fisher=True, gains=False)
    want = torch.zeros_like(model[0].weight)
    batch_grad = torch.zeros_like(model[0].weight)
    for i in range(5):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        want += model[0].weight.grad.square()
        batch_grad += model[0].weight.grad
    torch.testing.assert_close(fisher["0"], want / 5)
    assert not torch.allclose(fisher["0"], (batch_grad / 5).square())  # not the squared mean gradient


def test_fisher_without_labels_uses_the_models_argmax():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    x = torch.randn(6, 4)
    labels = model(x).argmax(1).detach()
    layers = mixquant.find_layers(model)
    a, _, _ = sens.gradient_stats(model, layers, [Batch((x,))], "kl", fisher=True, gains=False)
    b, _, _ = sens.gradient_stats(model, layers, [Batch((x,), {}, labels)], "kl", fisher=True, gains=False)
    torch.testing.assert_close(a["0"], b["0"])


def test_gains_survive_an_in_place_activation():
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    head = nn.Linear(3, 4)

    class Net(nn.Module):
        def __init__(self, inplace):
            super().__init__()
            self.conv, self.act, self.head = conv, nn.ReLU(inplace=inplace), head

        def forward(self, x):
            return self.head(self.act(self.conv(x)).mean((2, 3)))

    x = torch.randn(4, 2, 5, 5)
    layers = {"conv": conv}
    _, g_inplace, _ = sens.gradient_stats(Net(True).eval(), layers, [Batch((x,))], "kl", fisher=False, gains=True)
    _, g_plain, _ = sens.gradient_stats(Net(False).eval(), layers, [Batch((x,))], "kl", fisher=False, gains=True)
    torch.testing.assert_close(g_inplace["conv"], g_plain["conv"])
    assert (g_plain["conv"] > 0).any()


# -- "model" and the prefix replay ------------------------------------------------


@pytest.mark.parametrize("make", [tiny_resnet, tiny_mobilenet])
def test_replay_equals_a_full_forward(make):
    model = make().eval()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    names = list(mixquant.find_layers(model))
    with torch.no_grad():
        replay = PrefixReplay(model, lambda: model(x), names, 2**30)
        for name in names:
            layer = model.get_submodule(name)
            saved = layer.weight.data
            layer.weight.data = saved * 1.25 + 0.01
            try:
                assert torch.equal(replay.replay(name), model(x)), name
            finally:
                layer.weight.data = saved
    assert any(replay.replayed[n] for n in names)


class Shared(nn.Module):
    """A module called twice (before and after the layer), tuple outputs and keyword inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.mid = nn.Linear(4, 4)
        self.post = nn.Linear(4, 2)

    def split(self, x):
        return x, x * 2

    def forward(self, x, scale=1.0):
        h = self.act(self.pre(x))
        a, b = self.split(h)
        h = self.act(self.mid(a) + b)
        return self.post(h) * scale


def test_replay_with_a_shared_module_and_keyword_inputs():
    model = Shared().eval()
    x = torch.randn(5, 4)
    batch = Batch((x,), {"scale": 3.0})
    with torch.no_grad():
        replay = PrefixReplay(model, lambda: batch.run(model), ["mid", "post"], 2**30)
        for name in ("mid", "post"):
            layer = model.get_submodule(name)
            saved = layer.weight.data
            layer.weight.data = -saved
            try:
                assert torch.equal(replay.replay(name), batch.run(model))
            finally:
                layer.weight.data = saved


def test_model_costs_equal_full_forwards_and_the_fallback():
    model = tiny_resnet().eval()
    layers = mixquant.find_layers(model)
    tables = {n: mixquant.roundoff_error(m.weight, [2, 4], per_channel=True) for n, m in layers.items()}
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    got = sens.measure_sensitivity("model", model, layers, tables, collect_batches(x))
    name = "layer1.1.conv2"
    layer = layers[name]
    with torch.no_grad():
        fp = model(x)
        saved = layer.weight.data
        for i, wq in enumerate(sens.candidate_weights(layer, tables[name])):
            layer.weight.data = wq
            q = model(x)
            layer.weight.data = saved
            lp, lq = F.log_softmax(fp, 1), F.log_softmax(q, 1)
            want = float((lp.exp() * (lp - lq)).sum(1).clamp_min(0).mean())
            assert got.costs[name][i] == pytest.approx(want, rel=1e-5, abs=1e-12)
    old = sens.REPLAY_MAX_BYTES
    sens.REPLAY_MAX_BYTES = 1  # too small: every candidate runs the whole model
    try:
        fallback = sens.measure_sensitivity("model", model, layers, tables, collect_batches(x))
    finally:
        sens.REPLAY_MAX_BYTES = old
    assert fallback.seconds["replayed"] == 0.0 and got.seconds["replayed"] == 1.0
    for n in layers:
        np.testing.assert_allclose(fallback.costs[n], got.costs[n], rtol=1e-6, atol=1e-12)


def test_data_dependent_control_flow_is_refused_by_the_replay():
    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.calls = nn.Linear(2, 2), nn.Linear(2, 2), 0

        def forward(self, x):
            self.calls += 1
            return self.b(self.a(x) if self.calls % 2 else x)

    m = Flaky()
    with torch.no_grad(), pytest.raises(RuntimeError, match="different module calls"):
        PrefixReplay(m, lambda: m(torch.randn(1, 2)), ["b"], 2**30)


# -- calibration batches -------------------------------------------------------------


def test_batches_of_every_form():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    ids, mask = torch.randint(0, 9, (4, 5)), torch.ones(4, 5, dtype=torch.long)
    assert collect_batches(x)[0].args[0] is not None
    b = collect_batches([(x, y)])[0]
    assert torch.equal(b.labels, y) and len(b.args) == 1
    b = collect_batches([(ids, mask)])[0]  # 2-D second entry: positional, not labels
    assert b.labels is None and len(b.args) == 2
    b = collect_batches({"input_ids": ids, "attention_mask": mask, "labels": y})[0]
    assert set(b.kwargs) == {"input_ids", "attention_mask"} and torch.equal(b.labels, y)
    bs = collect_batches([x, x, x], num_samples=6)
    assert [bb.size for bb in bs] == [4, 2]


@pytest.mark.parametrize("bad,match", [
    ([torch.tensor([[1.0, float("nan")]])], "batch 0: input 0 holds 1 non-finite"),
    ([torch.ones(2, 2), {"x": torch.tensor([[float("inf")]])}], "batch 1: input 'x'"),
    ([{"a": torch.ones(2, 1), "b": torch.ones(3, 1)}], "disagree"),
    ([], "empty"),
])
def test_bad_batches_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        collect_batches(bad)


def test_provenance_sees_inputs_and_labels():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 2])
    a = provenance(collect_batches([(x, y)]))
    assert a == provenance(collect_batches([(x.clone(), y.clone())])) and a["samples"] == 4
    assert a["sha256"] != provenance(collect_batches([(x, y.flip(0))]))["sha256"]
    x2 = x.clone()
    x2[0, 0] += 1e-6
    assert a["sha256"] != provenance(collect_batches([(x2, y)]))["sha256"]


# -- the search, the config and the CLI --------------------------------------------------


def test_search_arguments_are_checked():
    model = TwoPaths().eval()
    with pytest.raises(ValueError, match="needs calib_data"):
        mixquant.search(model, avg_bits=4, sensitivity="fisher")
    with pytest.raises(ValueError, match="objective applies to"):
        mixquant.search(model, avg_bits=4, sensitivity="input", calib_data=_calib(8), objective="mse")
    with pytest.raises(ValueError, match="sensitivity must be one of"):
        mixquant.search(model, avg_bits=4, sensitivity="hessian", calib_data=_calib(8))
    with pytest.raises(ValueError, match="output_loss"):
        mixquant.search(model, avg_bits=4, sensitivity="model", calib_data=_calib(8), output_loss="l1")
    cfg = mixquant.search(model, avg_bits=4, calib_data=_calib(8), output_loss="mse")
    assert cfg.sensitivity == sens.DEFAULT_DATA_SENSITIVITY == "model"  # the measured choice (docs/RESULTS.md)
    assert mixquant.search(model, avg_bits=4).sensitivity == "weight"


def test_qem_rule_on_a_data_aware_table_is_monotone():
    model = TwoPaths().eval()
    x = _calib(64)
    bits = [sum(mixquant.search(model, qem=q, sensitivity="fisher", calib_data=x, output_loss="mse").bits.values())
            for q in (1.0, 4.0, 16.0, 256.0)]
    assert bits == sorted(bits, reverse=True) and bits[0] > bits[-1]


def test_data_aware_config_round_trips_and_is_validated(tmp_path):
    model = TwoPaths().eval()
    cfg = mixquant.search(model, avg_bits=4, sensitivity="fisher", calib_data=_calib(32), output_loss="mse")
    path = tmp_path / "bits.json"
    cfg.save(path)
    back = mixquant.BitConfig.load(path)
    assert back.sensitivity == "fisher" and back.calibration == cfg.calibration and back.errors == cfg.errors
    assert back.error("b", "sensitivity") == cfg.error("b", "sensitivity") > 0
    data = json.loads(path.read_text())
    assert data["version"] == VERSION == 2
    for edit in (lambda d: d.update(sensitivity="hessian"), lambda d: d.update(calibration=None),
                 lambda d: d["calibration"].update(sha256="xyz"), lambda d: d["calibration"].update(samples=0),
                 lambda d: d["layers"][0]["errors"].pop("sensitivity"),
                 lambda d: d["layers"][0]["errors"]["sensitivity"].__setitem__(0, -1.0)):
        bad = json.loads(path.read_text())
        edit(bad)
        with pytest.raises(ValueError):
            mixquant.BitConfig.from_dict(bad)
    free = mixquant.search(model, avg_bits=4).to_dict()
    free["calibration"] = cfg.calibration
    with pytest.raises(ValueError, match="records no calibration"):
        mixquant.BitConfig.from_dict(free)


def test_version_1_files_still_load():
    model = TwoPaths().eval()
    d = mixquant.search(model, avg_bits=4).to_dict()
    d["version"] = 1
    del d["sensitivity"], d["calibration"], d["group_size"]
    cfg = mixquant.BitConfig.from_dict(d)
    assert cfg.sensitivity == "weight" and cfg.calibration is None


def test_cli_sensitivity_and_calib(tmp_path, monkeypatch, capsys):
    from mixquant.cli import main

    torch.save(_calib(64), tmp_path / "calib.pt")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "twopaths_factory.py").write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom test_sensitivity import TwoPaths\n"
        "def make():\n    return TwoPaths().eval()\n" % str(__import__("os").path.dirname(__file__)))
    out = tmp_path / "bits.json"
    rc = main(["search", "twopaths_factory:make", "--avg-bits", "4", "--sensitivity", "model",
               "--calib", str(tmp_path / "calib.pt"), "--calib-samples", "32", "--output-loss", "mse",
               "--out", str(out)])
    assert rc == 0
    cfg = mixquant.BitConfig.load(out)
    assert cfg.sensitivity == "model" and cfg.calibration["samples"] == 32 and cfg.bits["b"] > cfg.bits["a"]
    assert "sensitivity=model" in capsys.readouterr().out
    rc = main(["search", "twopaths_factory:make", "--avg-bits", "4", "--sensitivity", "model", "--out",
               str(tmp_path / "x.json")])
    assert rc == 2 and "needs calib_data" in capsys.readouterr().err
