"""The MixQuant search: QEM rule, exact budget rule, keep/filter, uniform baseline, bad input."""

import itertools
import math

import pytest
import torch
import torch.nn as nn

import mixquant
from conftest import make_small_net


def test_finds_layers_by_fqn_in_order(small_net):
    assert list(mixquant.find_layers(small_net)) == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    only_conv = mixquant.find_layers(small_net, lambda m, name: isinstance(m, nn.Conv2d))
    assert list(only_conv) == ["conv1", "conv2", "conv3"]


def test_registered_type_and_conv_transpose_are_found():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 5))

    mixquant.register_quantizable(Custom)
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3), Custom(), nn.LayerNorm(5))
    layers = mixquant.find_layers(model)
    assert list(layers) == ["0", "1"]
    assert mixquant.channel_axis(layers["0"]) == 1
    config = mixquant.uniform(model, 4)
    assert config.groups == {"0": 6, "1": 6}


@pytest.mark.parametrize("reference", ["layer", "model"])
def test_qem_rule_is_monotone_in_qem(small_net, reference):
    previous = None
    for qem in [0.5, 1.0, 2.0, 4.0, 16.0, 64.0, 256.0, 4096.0, 1e6]:
        config = mixquant.search(small_net, qem=qem, qem_reference=reference)
        if previous is not None:
            assert all(config.bits[k] <= previous.bits[k] for k in config.bits)
        previous = config
    assert set(previous.bits.values()) == {2}  # a huge multiplier admits the smallest candidate


def test_qem_rule_follows_its_definition(small_net):
    config = mixquant.search(small_net, bits=[2, 3, 4, 5, 6, 7, 8], qem=16.0)
    for name, b in config.bits.items():
        ref = config.error(name, "sse", 8)
        ok = [c for c in config.candidates if config.error(name, "sse", c) <= 16.0 * ref]
        assert b == ok[0]
    # with its own 8-bit error as reference, a layer at qem=1 never needs more than 8 bits
    assert max(mixquant.search(small_net, qem=1.0).bits.values()) <= 8


@pytest.mark.parametrize("avg_bits", [2.0, 2.5, 3.0, 4.25, 6.0])
@pytest.mark.parametrize("objective", ["norm", "mse", "sse"])
def test_budget_rule_meets_budget_and_is_optimal(small_net, avg_bits, objective):
    cands = [2, 3, 4, 6, 8]
    config = mixquant.search(small_net, cands, avg_bits=avg_bits, objective=objective)
    assert config.avg_bits <= avg_bits + 1e-12
    names = list(config.bits)
    n = config.num_params
    total = sum(n.values())
    best = math.inf
    for choice in itertools.product(cands, repeat=len(names)):
        if sum(n[k] * b for k, b in zip(names, choice)) <= avg_bits * total:
            best = min(best, sum(config.error(k, objective, b) for k, b in zip(names, choice)))
    assert config.total_error(objective) == pytest.approx(best, rel=1e-12)


def test_budget_rule_beats_uniform_at_same_average(small_net):
    # per tensor, one large row makes the small conv3 far more sensitive than the rest
    with torch.no_grad():
        small_net.conv3.weight[0].mul_(50.0)
    mixed = mixquant.search(small_net, avg_bits=3.0, per_channel=False, objective="mse")
    flat = mixquant.uniform(small_net, 3, per_channel=False)
    assert mixed.avg_bits <= flat.avg_bits
    assert mixed.total_error("mse") < 0.8 * flat.total_error("mse")
    assert mixed.bits["conv3"] > 3
    assert len(set(mixed.bits.values())) > 1


def test_max_bytes_budget(small_net):
    target = mixquant.uniform(small_net, 4).size_bytes
    config = mixquant.search(small_net, max_bytes=target)
    assert config.size_bytes <= target
    assert config.rule["name"] == "budget"


def test_keep_pins_layers_and_counts_in_budget(small_net):
    config = mixquant.search(small_net, avg_bits=3.0, keep={"conv1": 8, "fc2": 8})
    assert config.bits["conv1"] == 8 and config.bits["fc2"] == 8
    assert config.avg_bits <= 3.0 + 1e-12
    assert config.rule["keep"] == "conv1=8,fc2=8"


def test_search_is_deterministic(small_net):
    a = mixquant.search(small_net, avg_bits=3.3)
    b = mixquant.search(make_small_net(), avg_bits=3.3)
    assert a.to_dict() == b.to_dict()


def test_uniform_config_figures(small_net):
    config = mixquant.uniform(small_net, 4, keep={"conv1": 8})
    n = config.num_params
    assert config.avg_bits == pytest.approx((8 * n["conv1"] + 4 * (sum(n.values()) - n["conv1"])) / sum(n.values()))
    expected = sum((n[k] * b + 7) // 8 + 8 * config.groups[k] for k, b in config.bits.items())
    assert config.size_bytes == expected
    assert config.groups["fc1"] == 64
    assert mixquant.uniform(small_net, 4, per_channel=False).groups["fc1"] == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "exactly one of"),
        (dict(qem=2.0, avg_bits=3.0), "exactly one of"),
        (dict(avg_bits=1.5), "below the smallest reachable average"),
        (dict(max_bytes=10), "below the smallest reachable size"),
        (dict(avg_bits=3, bits=[]), "empty"),
        (dict(avg_bits=3, bits=[0, 4]), "1..16"),
        (dict(avg_bits=3, bits=[4, 17]), "1..16"),
        (dict(qem=-1.0), "qem must be a positive"),
        (dict(avg_bits=float("nan")), "avg_bits must be a positive"),
        (dict(avg_bits=3, keep={"nope": 8}), "'nope'"),
        (dict(avg_bits=3, keep={"conv1": 20}), "keep\\['conv1'\\]"),
        (dict(avg_bits=3, objective="l1"), "objective"),
        (dict(qem=2.0, qem_reference="global"), "qem_reference"),
        (dict(avg_bits=3, clip="percentile"), "clip"),
    ],
)
def test_bad_arguments_raise_clear_errors(small_net, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mixquant.search(small_net, **kwargs)


def test_bits_type_errors(small_net):
    with pytest.raises(TypeError, match="bits"):
        mixquant.search(small_net, bits=[2.5, 4], avg_bits=3)
    with pytest.raises(TypeError, match="model"):
        mixquant.search("not a model", avg_bits=3)


def test_model_without_quantizable_layer():
    with pytest.raises(ValueError, match="no quantizable layer"):
        mixquant.search(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), avg_bits=3)
    with pytest.raises(ValueError, match="no quantizable layer"):
        mixquant.uniform(make_small_net(), 4, filter_fn=lambda m, n: False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_name_the_layer(small_net, bad):
    with torch.no_grad():
        small_net.conv2.weight[3, 1, 0, 0] = bad
    with pytest.raises(ValueError, match="layer 'conv2'.*non-finite"):
        mixquant.search(small_net, avg_bits=4)


def test_all_zero_layer_costs_nothing():
    model = make_small_net()
    with torch.no_grad():
        model.conv3.weight.zero_()
    config = mixquant.search(model, avg_bits=3.0)
    assert config.bits["conv3"] == 2
    assert config.error("conv3", "sse") == 0.0 and config.error("conv3", "norm") == 0.0
