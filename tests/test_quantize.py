"""mixquant.quantize with the vanilla asymmetric method, BN folding, options and input checks."""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn
from _quant_models import Odd, TinyResNet, images, tiny_mobilenet, tiny_resnet

import mixquant
from mixquant.nn.fold import find_bn_pairs, fold_bn
from mixquant.methods import AsymmetricOptions, BrecqOptions, is_block, register_block
from mixquant.methods.blocks import build_units
from mixquant.nn.qmodules import ActQuantizer
from mixquant.api.quantize import quant_info, quantize


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _mixed_config(model: nn.Module, **kw) -> mixquant.BitConfig:
    names = list(mixquant.find_layers(model))
    keep = {name: (3, 5, 8, 2, 6, 4, 7)[i % 7] for i, name in enumerate(names)}
    return mixquant.uniform(model, 4, keep=keep, errors=False, **kw)


def _codes(layer: nn.Module) -> torch.Tensor:
    """Integer codes of a quantized layer's weight, asserted integral and in range."""
    w, ch = layer.weight.detach(), layer.mixquant_ch_axis
    shape = [1] * w.dim()
    shape[ch] = -1
    s = layer.weight_scale.reshape(shape if layer.weight_scale.numel() > 1 else [1] * w.dim())
    z = layer.weight_zero_point.reshape(s.shape).float()
    q = w / s + z
    assert torch.allclose(q, torch.round(q), atol=1e-3), "weight off its grid"
    q = torch.round(q)
    assert q.min() >= 0 and q.max() <= 2**layer.mixquant_bits - 1
    return q


def test_8bit_outputs_close(small_net):
    x = torch.randn(16, 3, 16, 16)
    cfg = mixquant.uniform(small_net, 8, errors=False)
    q = quantize(small_net, cfg, progress=False)
    with torch.no_grad():
        ref, out = small_net(x), q(x)
    assert (out - ref).abs().max() <= 2e-2 * ref.abs().max()
    assert not torch.equal(out, ref)


@pytest.mark.parametrize("per_channel,symmetric,clip", [(True, False, "minmax"), (False, False, "mse"), (True, True, "mse")])
def test_weights_on_grid_at_each_layers_bits(per_channel, symmetric, clip):
    model = tiny_resnet()
    cfg = _mixed_config(model, per_channel=per_channel, symmetric=symmetric, clip=clip)
    q = quantize(model, cfg, progress=False)
    for name, bits in cfg.bits.items():
        layer = q.get_submodule(name)
        assert layer.mixquant_bits == bits
        assert layer.weight_scale.numel() == (layer.weight.shape[0] if per_channel else 1)
        _codes(layer)
    info = quant_info(q)
    assert info.bits == cfg.bits
    assert info.avg_bits == pytest.approx(cfg.avg_bits)
    assert info.size_bytes == cfg.size_bytes


def test_transposed_conv_channel_axis():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 6, 3)).eval()
    cfg = mixquant.uniform(model, 3, errors=False)
    q = quantize(model, cfg, progress=False)
    layer = q[2]
    assert layer.mixquant_ch_axis == 1 and layer.weight_scale.numel() == 6
    codes = _codes(layer)
    for c in range(6):
        assert codes[:, c].unique().numel() <= 8


def test_three_bit_layer_has_at_most_8_codes_per_channel():
    model = tiny_resnet()
    cfg = _mixed_config(model)
    three = [n for n, b in cfg.bits.items() if b == 3]
    assert three
    q = quantize(model, cfg, progress=False)
    for name in three:
        codes = _codes(q.get_submodule(name))
        for c in range(codes.shape[0]):
            assert codes[c].unique().numel() <= 8


def test_input_model_untouched_and_copy_returned():
    model = tiny_resnet().train()
    before = _state(model)
    cfg = mixquant.uniform(model, 4, errors=False)
    q = quantize(model, cfg, calib_data=images(32), act_bits=8, progress=False)
    assert q is not model and model.training
    assert _same_state(before, _state(model))
    assert not any(isinstance(m, ActQuantizer) for m in model.modules())
    assert not model.conv1._forward_pre_hooks
    assert not q.training


def test_inplace_replaces_contents():
    model = tiny_resnet()
    cfg = mixquant.uniform(model, 4, errors=False)
    ref = quantize(model, cfg, progress=False)
    out = quantize(model, cfg, progress=False, inplace=True)
    assert out is model and hasattr(model, "mixquant_state")
    assert _same_state(_state(ref), _state(model))
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model, cfg, progress=False)


def test_activations_quantized_to_their_bits():
    model = tiny_resnet()
    cfg = mixquant.uniform(model, 8, errors=False)
    x = images(32)
    q = quantize(model, cfg, calib_data=x, act_bits=3, last_layer_input_bits=5, progress=False)
    seen = {}

    def grab(name):
        def hook(_m, args):
            seen[name] = args[0].detach()
        return hook

    # register after the quantizer's hook so the hook sees the quantized input
    for name in cfg.bits:
        q.get_submodule(name).register_forward_pre_hook(grab(name))
    with torch.no_grad():
        q(x)
    order = q.mixquant_state.config.bits
    assert q.mixquant_state.input_act_bits["conv1"] == 8  # model input: first_layer_input_bits
    assert q.mixquant_state.input_act_bits["fc"] == 5
    for name in order:
        bits = q.mixquant_state.input_act_bits[name]
        assert seen[name].unique().numel() <= 2**bits
    assert seen["layer1.0.conv2"].unique().numel() <= 8


def test_first_layer_input_float_and_block_outputs():
    model = tiny_resnet()
    cfg = mixquant.uniform(model, 6, errors=False)
    q = quantize(model, cfg, calib_data=images(32), act_bits=4, first_layer_input_bits=None,
                 quantize_block_outputs=True, progress=False)
    assert "conv1" not in q.mixquant_state.input_act_bits
    assert set(q.mixquant_state.output_act_bits) == {"layer1.0", "layer1.1"}
    assert isinstance(q.layer1[0].output_quantizer, ActQuantizer)


@pytest.mark.parametrize("data", ["tensor", "tuples", "loader", "generator"])
def test_calibration_data_forms(data):
    model = tiny_resnet()
    x, y = images(24), torch.randint(0, 10, (24,))
    if data == "tensor":
        calib = x
    elif data == "tuples":
        calib = [(x[:10], y[:10]), (x[10:], y[10:])]
    elif data == "loader":
        calib = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    else:
        calib = (x[i : i + 5] for i in range(0, 24, 5))
    cfg = mixquant.uniform(model, 4, errors=False)
    q = quantize(model, cfg, calib_data=calib, act_bits=8, progress=False)
    ref = quantize(model, cfg, calib_data=x, act_bits=8, progress=False)
    assert _same_state(_state(q), _state(ref))


# -- bad input --------------------------------------------------------------


def test_bad_input_leaves_model_untouched():
    model = tiny_resnet()
    before = _state(model)
    cfg = mixquant.uniform(model, 4, errors=False)
    with pytest.raises(ValueError, match="calib_data does not fit"):
        quantize(model, cfg, calib_data=torch.randn(8, 5, 8, 8), act_bits=8, progress=False)
    with pytest.raises(ValueError, match="sample shape"):
        quantize(model, cfg, calib_data=[images(4), torch.randn(4, 3, 9, 9)], act_bits=8, progress=False)
    with pytest.raises(ValueError, match="empty"):
        quantize(model, cfg, calib_data=[], act_bits=8, progress=False)
    with pytest.raises(ValueError, match="empty"):
        quantize(model, cfg, calib_data=torch.empty(0, 3, 8, 8), act_bits=8, progress=False)
    with pytest.raises(ValueError, match="needs calib_data"):
        quantize(model, cfg, act_bits=8, progress=False)
    with pytest.raises(ValueError, match="needs calib_data"):
        quantize(model, cfg, "brecq", progress=False)
    other = mixquant.uniform(tiny_mobilenet(), 4, errors=False)
    with pytest.raises(ValueError, match="does not fit"):
        quantize(model, other, progress=False)
    for bad in (1, 17, 0):
        with pytest.raises(ValueError, match="act_bits"):
            quantize(model, cfg, calib_data=images(4), act_bits=bad, progress=False)
    with pytest.raises(TypeError, match="act_bits"):
        quantize(model, cfg, calib_data=images(4), act_bits="8", progress=False)
    with pytest.raises(TypeError, match="calib_data batch 0"):
        quantize(model, cfg, calib_data=[{"x": images(4)}], act_bits=8, progress=False)
    with pytest.raises(ValueError, match="floating point"):
        quantize(model, cfg, calib_data=torch.zeros(4, 3, 8, 8, dtype=torch.long), act_bits=8, progress=False)
    with pytest.raises(TypeError, match="BitConfig"):
        quantize(model, {"conv1": 4}, progress=False)
    with pytest.raises(ValueError, match="method"):
        quantize(model, cfg, "gptq", progress=False)
    assert _same_state(before, _state(model))


def test_options_validation():
    model = tiny_resnet()
    cfg = mixquant.uniform(model, 4, errors=False)
    with pytest.raises(TypeError, match="unknown option 'itres'"):
        quantize(model, cfg, "brecq", calib_data=images(4), itres=10)
    with pytest.raises(TypeError, match="unknown option 'iters'"):
        quantize(model, cfg, "asymmetric", iters=10)
    with pytest.raises(ValueError, match="clip"):
        AsymmetricOptions(clip="percentile")
    with pytest.raises(ValueError, match="loss"):
        BrecqOptions(loss="kl")
    with pytest.raises(TypeError, match="iters"):
        BrecqOptions(iters=1.5)
    with pytest.raises(ValueError, match="warmup"):
        BrecqOptions(warmup=1.0)
    with pytest.raises(ValueError, match="device"):
        BrecqOptions(device="tpu9")
    with pytest.raises(ValueError, match="first_layer_input_bits"):
        AsymmetricOptions(first_layer_input_bits=1)
    with pytest.raises(TypeError, match="options must be a AsymmetricOptions"):
        quantize(model, cfg, options=BrecqOptions())
    q = quantize(model, cfg, options=AsymmetricOptions(clip="mse"), p=2.4, progress=False)
    assert q.mixquant_state.options["clip"] == "mse" and q.mixquant_state.options["p"] == 2.4
    assert BrecqOptions().iters == 20000 and BrecqOptions().rounding_weight == 0.01


# -- BN folding ---------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_resnet, tiny_mobilenet])
def test_fold_bn_preserves_outputs(make):
    model = make()
    x = images(8)
    folded = fold_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-4)


def test_fold_bn_linear_transposed_and_untraceable():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.ConvTranspose2d(3, 5, 3)
            self.bn = nn.BatchNorm2d(5)
            self.fc = nn.Linear(5, 7)
            self.bn1d = nn.BatchNorm1d(7)

        def forward(self, x):
            if x.sum() > -1e9:  # data-dependent control flow: torch.fx cannot trace it
                x = self.bn(self.conv(x))
            return self.bn1d(self.fc(x.mean((2, 3))))

    torch.manual_seed(0)
    model = Untraceable()
    for bn in (model.bn, model.bn1d):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    model.eval()
    assert find_bn_pairs(model) == [("conv", "bn"), ("fc", "bn1d")]
    x = torch.randn(4, 3, 6, 6)
    folded = fold_bn(model)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-4)


def test_fold_bn_skips_shared_or_unrelated_bn():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # conv output used twice: folding would change the sum

    assert find_bn_pairs(Shared()) == []


# -- units ----------------------------------------------------------------------


def test_block_detection_and_registry():
    res, mob = tiny_resnet(), tiny_mobilenet()
    assert is_block(res.layer1[0]) and is_block(mob.features[1]) and not is_block(res)
    units = build_units(res, mixquant.uniform(res, 4, errors=False).bits)
    assert [(u.name, u.kind) for u in units] == [
        ("conv1", "layer"), ("layer1.0", "block"), ("layer1.1", "block"), ("fc", "layer")]
    assert units[2].layers == ["layer1.1.conv1", "layer1.1.conv2", "layer1.1.downsample.0"]
    odd = Odd()
    assert [u.kind for u in build_units(odd, mixquant.uniform(odd, 4, errors=False).bits)] == ["layer"] * 3

    class MyBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return x + self.a(x)

    assert not is_block(MyBlock())
    register_block(MyBlock)
    assert is_block(MyBlock())
    with pytest.raises(TypeError):
        register_block(3)


def test_quant_info_rejects_float_model():
    with pytest.raises(ValueError, match="not quantized"):
        quant_info(TinyResNet())
