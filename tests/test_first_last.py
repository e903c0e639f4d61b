"""Methods apply a config's bits as they are; first/last pinning lives in the config (keep=)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from _quant_models import images, tiny_resnet

import mixquant
from mixquant.api.quantize import quantize


class Backwards(nn.Module):
    """Layers defined in the opposite order of their use, plus one that never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(6, 4)
        self.unused = nn.Linear(4, 4)
        self.mid = nn.Conv2d(6, 6, 1)
        self.stem = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(torch.relu(self.stem(x))).mean((2, 3)))


def _codes_per_channel(layer: nn.Module) -> int:
    w = layer.weight.detach()
    return max(w[c].unique().numel() for c in range(w.shape[0]))


@pytest.mark.parametrize("method", ["asymmetric", "brecq"])
def test_methods_apply_the_configured_bits_exactly(method):
    model = tiny_resnet()
    cfg = mixquant.uniform(model, 3, errors=False)
    kwargs = {"calib_data": images(16), "iters": 2, "batch_size": 8, "num_threads": 1} if method == "brecq" else {}
    q = quantize(model, cfg, method, progress=False, **kwargs)
    assert q.mixquant_state.config.bits == cfg.bits == q.mixquant_state.requested_bits
    assert mixquant.quant_info(q).avg_bits == pytest.approx(3.0)
    for name in cfg.bits:  # first and last layer included: at most 2**3 levels per channel
        assert _codes_per_channel(q.get_submodule(name)) <= 8, name


@pytest.mark.parametrize("method", ["asymmetric", "brecq"])
def test_removed_first_last_option_is_refused_with_the_replacement(method):
    model = tiny_resnet()
    cfg = mixquant.uniform(model, 4, errors=False)
    extra = {"calib_data": images(8), "iters": 1, "num_threads": 1} if method == "brecq" else {}
    with pytest.raises(ValueError, match="keep_first_last"):
        quantize(model, cfg, method, keep_first_last_8bit=True, progress=False, **extra)
    with pytest.raises(ValueError, match="removed"):
        quantize(model, cfg, method, keep_first_last_8bit=1, progress=False, **extra)
    # False asks for what every method now does: accepted, bits untouched.
    q = quantize(model, cfg, method, keep_first_last_8bit=False, progress=False, **extra)
    assert q.mixquant_state.config.bits == cfg.bits
    assert "keep_first_last_8bit" not in q.mixquant_state.options


def test_first_last_layers_follow_execution_not_definition():
    model = Backwards().eval()
    assert list(mixquant.find_layers(model)) == ["head", "unused", "mid", "stem"]
    assert mixquant.first_last_layers(model, torch.randn(1, 3, 8, 8)) == ("stem", "head")
    assert mixquant.keep_first_last(model, torch.randn(2, 3, 8, 8)) == {"stem": 8, "head": 8}
    assert mixquant.keep_first_last(model, torch.randn(1, 3, 8, 8), bits=6) == {"stem": 6, "head": 6}
    skip_head = lambda m, name: name != "head"  # noqa: E731
    assert mixquant.first_last_layers(model, torch.randn(1, 3, 8, 8), filter_fn=skip_head) == ("stem", "mid")
    assert model.training is False


def test_first_last_layers_restores_training_mode_and_leaves_no_hooks():
    model = Backwards().train()
    mixquant.first_last_layers(model, torch.randn(1, 3, 8, 8))
    assert model.training and model.stem.training
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_keep_first_last_pins_them_in_search_and_uniform():
    model = tiny_resnet()
    keep = mixquant.keep_first_last(model, images(1))
    assert keep == {"conv1": 8, "fc": 8}
    cfg = mixquant.search(model, avg_bits=4.0, keep=keep)
    assert cfg.bits["conv1"] == 8 and cfg.bits["fc"] == 8 and cfg.avg_bits <= 4.0 + 1e-9
    uni = mixquant.uniform(model, 3, keep=keep, errors=False)
    assert uni.bits["conv1"] == 8 and uni.bits["layer1.0.conv1"] == 3
    q = quantize(model, uni, "asymmetric", progress=False)
    assert q.mixquant_state.config.bits == uni.bits


def test_first_last_layers_errors():
    model = Backwards().eval()
    with pytest.raises(ValueError, match="example input"):
        mixquant.first_last_layers(model, None)
    with pytest.raises(ValueError, match="bits"):
        mixquant.keep_first_last(model, torch.randn(1, 3, 8, 8), bits=0)

    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    with pytest.raises(ValueError, match="no quantizable layer"):
        mixquant.first_last_layers(Skips(), torch.randn(1, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="TorchScript"):
        mixquant.first_last_layers(scripted, torch.randn(1, 3))
