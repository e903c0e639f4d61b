"""quantize on unusual inputs: non-finite calibration data, float16/bfloat16, parametrized and meta models.

Each case either works exactly (checked against float32 or the export round
trip) or is refused up front with a ValueError that names the problem.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

import mixquant
from _quant_models import TinyResNet, images, tiny_resnet
from conftest import SmallNet, make_small_net
from mixquant.nn import qmodules

BRECQ_QUICK = dict(iters=2, act_iters=2, num_samples=8, batch_size=4)


def _quantize(model, method, **kw):
    extra = BRECQ_QUICK if method == "brecq" else {}
    return mixquant.quantize(model, mixquant.uniform(model, 4), method, progress=False, **extra, **kw)


def _act_scales(q):
    return [float(m.scale) for _, m in qmodules.act_quantizers(q)]


# --------------------------------------------------- non-finite calibration --
@pytest.mark.parametrize("method", ["asymmetric", "brecq"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_calibration_data_is_refused(method, value):
    # Used to: asymmetric set every activation scale to 1.0 silently (NaN); BRECQ gave NaN scales and
    # outputs with no error; Inf gave "ActQuantizer saw no data".
    x = images(16)
    x[5, 1, 2, 3] = value
    batches = [x[i:i + 4] for i in range(0, 16, 4)]
    with pytest.raises(ValueError, match=r"calib_data batch 0 contains 1 non-finite .* sample 5"):
        _quantize(tiny_resnet(), method, act_bits=8, calib_data=x)
    with pytest.raises(ValueError, match=r"calib_data batch 1 .* sample 1"):
        _quantize(tiny_resnet(), method, act_bits=8, calib_data=batches)
    if method == "brecq":  # weights only: BRECQ still reconstructs from the data
        with pytest.raises(ValueError, match="non-finite"):
            _quantize(tiny_resnet(), method, calib_data=batches)


def test_activations_that_overflow_are_named_by_layer():
    # Finite data whose activations overflow float32 inside the model: the layer is named, not 1.0 scales.
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1e30)
    x = torch.ones(8, 4) * 1e10
    with pytest.raises(ValueError, match=r"samples 0\.\.7 give non-finite activations .* input of layer '1'"):
        mixquant.quantize(model, mixquant.uniform(model, 8), act_bits=8, calib_data=x, progress=False)


def test_finite_calibration_still_works():
    q = _quantize(tiny_resnet(), "asymmetric", act_bits=8, calib_data=images(16))
    scales = _act_scales(q)
    assert scales and all(s != 1.0 and s > 0 for s in scales)


# ------------------------------------------------------ float16 / bfloat16 --
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["asymmetric", "brecq"])
def test_half_models_quantize_export_and_load(dtype, method, tmp_path):
    # Used to: asymmetric quantized but export failed "off grid"; BRECQ failed on a dtype mismatch.
    model = tiny_resnet().to(dtype)
    x = images(8).to(dtype)
    q = _quantize(model, method, calib_data=x, act_bits=8, fold_bn=True) if method == "asymmetric" else \
        _quantize(model, method, calib_data=x, act_bits=8)
    for name in q.mixquant_state.config.bits:
        layer = q.get_submodule(name)
        assert layer.weight.dtype == dtype and layer.bias is None or layer.bias.dtype == dtype, name
        assert layer.weight_scale.dtype == torch.float32 and qmodules.grid_codes(layer) is not None, name
    out = q(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    mixquant.export(q, tmp_path / "q.safetensors")
    restored = mixquant.load_quantized(tmp_path / "q.safetensors", TinyResNet().to(dtype))
    assert torch.equal(restored(x), out)  # bit-exact in the model's own dtype
    assert next(model.parameters()).dtype == dtype  # the caller's model is untouched


def test_half_weights_equal_the_float32_grid_rounded():
    # The stored float16 weight is the float32 grid value rounded once: codes and scales as in float32.
    q32 = _quantize(make_small_net().half().float(), "asymmetric")  # the same weights, in float32
    q16 = _quantize(make_small_net().half(), "asymmetric")
    for name in q32.mixquant_state.config.bits:
        a, b = q32.get_submodule(name), q16.get_submodule(name)
        assert torch.equal(a.weight.detach().half(), b.weight.detach())
        assert torch.equal(qmodules.grid_codes(a), qmodules.grid_codes(b))


def test_bits_a_half_dtype_cannot_carry_are_refused_up_front():
    model = make_small_net().to(torch.bfloat16)
    config = mixquant.uniform(model, 9)
    with pytest.raises(ValueError, match=r"bfloat16 weight cannot carry 9-bit codes exactly \(at most 8"):
        mixquant.quantize(model, config, progress=False)
    mixquant.quantize(make_small_net().half(), mixquant.uniform(model, 11), progress=False)  # float16: fine


# --------------------------------------------------- parametrized weights --
def _on_grid(q):
    return all(qmodules.grid_codes(q.get_submodule(n)) is not None for n in q.mixquant_state.config.bits)


class _Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


def _parametrized(kind):
    model = make_small_net()
    if kind == "weight_norm":
        weight_norm(model.fc1)
        weight_norm(model.conv2)
    elif kind == "custom":
        parametrize.register_parametrization(model.conv1, "weight", _Doubled())
    else:  # the older hook-based weight_norm
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.nn.utils.weight_norm(model.fc1)
    return model


@pytest.mark.parametrize("kind", ["weight_norm", "custom"])
@pytest.mark.parametrize("method", ["asymmetric", "brecq"])
def test_parametrized_layers_are_quantized_on_grid(kind, method, tmp_path):
    # Used to: asymmetric left weight_norm weights off grid silently; BRECQ raised KeyError: 'weight'.
    model = _parametrized(kind)
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        expect = model(x)
    q = _quantize(model, method, calib_data=x)
    assert _on_grid(q)
    assert not any(parametrize.is_parametrized(m) for m in q.modules())
    assert any(parametrize.is_parametrized(m) for m in model.modules())  # the caller's model is untouched
    with torch.no_grad():
        assert torch.allclose(q(x), expect, atol=0.5 * expect.abs().max().item())  # 4 bits: close, not equal
    mixquant.export(q, tmp_path / "q.safetensors")
    restored = mixquant.load_quantized(tmp_path / "q.safetensors", _parametrized(kind))
    with torch.no_grad():
        assert torch.equal(restored(x), q(x))


def test_search_sees_the_materialised_weight():
    model = _parametrized("custom")
    plain = make_small_net()
    with torch.no_grad():
        plain.conv1.weight.mul_(2)
    assert mixquant.search(model, avg_bits=4).errors == mixquant.search(plain, avg_bits=4).errors


def test_fold_bn_into_a_parametrized_conv():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    weight_norm(model[0])
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expect = model(x)
        folded = mixquant.fold_bn(model)
        assert torch.allclose(folded(x), expect, atol=1e-5)  # used to: the fold did not reach the computed weight


def test_hook_weight_norm_is_refused_up_front():
    # The deprecated hook-based weight_norm keeps a non-leaf weight that torch cannot copy; it used to
    # reach a RuntimeError from deepcopy (quantize works on a copy). Now: a ValueError naming the layer.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = make_small_net()
        torch.nn.utils.weight_norm(model.fc1)
    with pytest.raises(ValueError, match=r"layer 'fc1'.*torch.nn.utils.parametrizations.weight_norm"):
        mixquant.quantize(model, mixquant.uniform(model, 4), progress=False)


def test_fold_bn_removes_hook_weight_norm_in_place():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(model[0])
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(5, 3)
    with torch.no_grad():
        expect = model(x)
        mixquant.fold_bn(model, inplace=True)
        assert not model[0]._forward_pre_hooks and torch.allclose(model(x), expect, atol=1e-5)


class _ComputedWeight(nn.Linear):
    """A layer whose weight is recomputed by a hook of its own: no way to store a quantized value."""

    def __init__(self):
        super().__init__(4, 3)
        base = self.weight.detach().clone()
        del self.weight
        self.base = nn.Parameter(base)
        self.weight = self.base.detach() * 1.0
        self.register_forward_pre_hook(lambda m, a: setattr(m, "weight", m.base.detach() * 1.0))


def test_unknown_computed_weight_is_refused():
    model = nn.Sequential(_ComputedWeight(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"layer '0': its weight is computed"):
        mixquant.quantize(model, mixquant.uniform(model, 4), progress=False)


# ------------------------------------------------------------ meta device --
@pytest.mark.parametrize("method", ["asymmetric", "brecq"])
def test_meta_models_are_refused(method):
    # Used to: BRECQ raised NotImplementedError from deep inside; asymmetric named a tensor, not the model.
    with torch.device("meta"):
        model = SmallNet()
    config = mixquant.uniform(make_small_net(), 4)
    with pytest.raises(ValueError, match="meta device"):
        mixquant.quantize(model, config, method, calib_data=torch.randn(8, 3, 16, 16), progress=False,
                          **(BRECQ_QUICK if method == "brecq" else {}))


def test_parametrized_model_that_is_its_own_layer_inplace(tmp_path):
    # The model itself is the parametrized layer: inplace must also roll back its parametrized class.
    model = weight_norm(nn.Linear(8, 4))
    x = torch.randn(3, 8)
    q = mixquant.quantize(model, mixquant.uniform(model, 4), inplace=True, progress=False)
    assert q is model and type(model) is nn.Linear and _on_grid(model)
    mixquant.export(model, tmp_path / "q.safetensors")
    restored = mixquant.load_quantized(tmp_path / "q.safetensors", weight_norm(nn.Linear(8, 4)))
    assert type(restored) is nn.Linear and torch.equal(restored(x), model(x))
