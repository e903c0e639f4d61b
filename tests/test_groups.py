"""Group-wise scales through the whole pipeline: search, both methods, export/load, sizes, the layout rule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from _quant_models import Conv1D, images, tiny_lm, tiny_resnet

import mixquant
from mixquant.allocation.bitconfig import layer_bytes

mixquant.register_quantizable(Conv1D, ch_axis=1)


class ConvLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)  # K = 27: groups of 16 leave a short last group
        self.fc = nn.Linear(12 * 4 * 4, 10)  # K = 192

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4).flatten(1))


def conv_linear(seed: int = 0) -> ConvLinear:
    torch.manual_seed(seed)
    return ConvLinear().eval()


def _on_group_grid(layer: nn.Module, gs: int) -> None:
    """The stored weight is exactly its group-wise quantization, with [C, G] bfloat16 parameters."""
    w, ch = layer.weight.detach(), layer.mixquant_ch_axis
    rows = w.shape[ch]
    k = w.numel() // rows
    assert layer.mixquant_group_size == gs
    assert tuple(layer.weight_scale.shape) == (rows, math.ceil(k / gs))
    assert torch.equal(layer.weight_scale.bfloat16().float(), layer.weight_scale)
    fq = mixquant.fake_quantize_tensor(w, layer.weight_scale, layer.weight_zero_point, layer.mixquant_bits,
                                       ch_axis=ch, group_size=gs)
    assert torch.equal(fq, w)


def test_layer_bytes_counts_bfloat16_scales_and_packed_zero_points():
    # 1000 weights at 3 bits in 40 groups: 375 bytes of codes, 80 of scales, 15 of zero points
    assert layer_bytes(1000, 3, 40, grouped=True) == 375 + 80 + 15
    assert layer_bytes(1000, 3, 40) == 375 + 8 * 40  # per channel: float32 + int32


@pytest.mark.parametrize("make, data, gs, embeddings", [
    (conv_linear, lambda: images(4, 8), 16, False),
    (lambda: tiny_lm(tied=False), lambda: torch.randint(0, 50, (3, 7)), 16, True),
    (lambda: tiny_lm(tied=True), lambda: torch.randint(0, 50, (3, 7)), 32, True),
])
def test_group_round_trip_bit_exact(tmp_path, make, data, gs, embeddings):
    """Linear, Conv2d, Embedding (and GPT-2's Conv1D, axis 1): quantize with groups, export, load, same outputs."""
    model = make()
    names = list(mixquant.find_layers(model, embeddings=embeddings))
    cfg = mixquant.uniform(model, 4, group_size=gs, embeddings=embeddings, errors=False,
                           keep={n: (2, 3, 5, 8, 11)[i % 5] for i, n in enumerate(names)})
    q = mixquant.quantize(model, cfg, progress=False)
    for name in cfg.bits:
        _on_group_grid(q.get_submodule(name), gs)
    path = tmp_path / "q.safetensors"
    info = mixquant.export(q, path)
    assert info.quantized_bytes == cfg.size_bytes == mixquant.quant_info(q).size_bytes
    expected = sum(layer_bytes(cfg.num_params[n], cfg.bits[n], cfg.groups[n], True) for n in cfg.bits)
    assert cfg.size_bytes == expected
    loaded = mixquant.load_quantized(path, make())
    x = data()
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    for name in cfg.bits:
        assert torch.equal(loaded.get_submodule(name).weight_scale, q.get_submodule(name).weight_scale)
    assert loaded.mixquant_state.config.group_size == gs


def test_groups_improve_on_per_channel_for_outlier_rows():
    """A group confines an outlier's range to its own group: less error than per channel at the same bits."""
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    w[:, 0] *= 50
    pc = mixquant.roundoff_error(w, [4], per_channel=True)
    g = mixquant.roundoff_error(w, [4], per_channel=True, group_size=32)
    assert g.sse[0] < 0.2 * pc.sse[0]


def test_search_with_groups_records_the_layout():
    model = conv_linear()
    cfg = mixquant.search(model, avg_bits=4, group_size=16)
    assert cfg.group_size == 16 and cfg.groups == {"conv": 12 * 2, "fc": 10 * 12}
    assert cfg.spec.group_size == 16
    again = mixquant.BitConfig.from_dict(cfg.to_dict())
    assert again == cfg
    t = mixquant.roundoff_error(model.conv.weight, cfg.errors["conv"]["bits"], per_channel=True, group_size=16)
    assert cfg.errors["conv"]["sse"] == t.sse.tolist()


def test_layout_choice_counts_scales_and_beats_fixed_layouts():
    model = conv_linear()
    sizes = [None, 16, 8]
    for bpw in (3.5, 4.5, 6.0):
        chosen = mixquant.search(model, bits_per_weight=bpw, group_size=sizes)
        assert chosen.bits_per_weight <= bpw and chosen.size_bytes * 8 <= bpw * chosen.total_params
        assert chosen.group_size is None and set(chosen.layer_group_size) == set(chosen.bits)
        assert chosen.rule["group_sizes"] == "none,16,8"
        for gs in sizes:  # every fixed layout is one of the options: the exact rule is never worse
            try:
                fixed = mixquant.search(model, bits_per_weight=bpw, group_size=gs)
            except ValueError:
                continue  # that layout cannot meet the budget at all
            assert chosen.total_error("norm") <= fixed.total_error("norm") * (1 + 1e-12)
        again = mixquant.BitConfig.from_dict(chosen.to_dict())
        assert again.layer_group_size == chosen.layer_group_size and again.size_bytes == chosen.size_bytes
        q = mixquant.quantize(model, chosen, progress=False)
        for name in chosen.bits:
            gs = chosen.group_size_of(name)
            layer = q.get_submodule(name)
            if gs is None:
                assert layer.mixquant_group_size is None and layer.weight_scale.dim() == 1
            else:
                _on_group_grid(layer, gs)


def test_layout_choice_gives_groups_to_the_layer_that_needs_them():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(256, 64), nn.Linear(256, 64))
    with torch.no_grad():
        model[0].weight[:, ::64] *= 40  # outliers: a group per 64 weights isolates them
    cfg = mixquant.search(model, bits_per_weight=4.3, group_size=[None, 64], bits=[3, 4, 5])
    assert cfg.group_size_of("0") == 64 and cfg.group_size_of("1") is None


def test_bad_group_arguments():
    model = conv_linear()
    with pytest.raises(ValueError, match="bits_per_weight or max_bytes"):
        mixquant.search(model, avg_bits=4, group_size=[None, 16])
    with pytest.raises(ValueError, match="bits_per_weight or max_bytes"):
        mixquant.search(model, qem=4, group_size=[16, 32])
    with pytest.raises(ValueError, match="per_channel"):
        mixquant.search(model, avg_bits=4, group_size=16, per_channel=False)
    with pytest.raises(ValueError, match="group_size"):
        mixquant.search(model, avg_bits=4, group_size=0)
    with pytest.raises(TypeError, match="group_size"):
        mixquant.search(model, avg_bits=4, group_size="128")
    with pytest.raises(ValueError, match="bits_per_weight"):
        mixquant.search(model, bits_per_weight=1.0, group_size=8)
    cfg = mixquant.uniform(model, 4, group_size=16, errors=False)
    with pytest.raises(ValueError, match="per_channel=False contradicts"):
        mixquant.quantize(model, cfg, per_channel=False, progress=False)
    cfg.groups["fc"] = 10 * 6  # what groups of 32 would need
    with pytest.raises(ValueError, match="'fc': config has 60 groups, model needs 120"):
        cfg.check_model(model)


def test_brecq_with_groups(tmp_path):
    model = tiny_resnet()
    x = images(16)
    cfg = mixquant.uniform(model, 3, group_size=8, errors=False)
    q = mixquant.quantize(model, cfg, "brecq", calib_data=x, iters=4, num_samples=16, batch_size=8, num_threads=1,
                          keep_first_last_8bit=False, progress=False)
    for name in cfg.bits:
        assert q.mixquant_state.config.bits[name] == 3
        _on_group_grid(q.get_submodule(name), 8)
    path = tmp_path / "b.safetensors"
    assert mixquant.export(q, path).quantized_bytes == q.mixquant_state.config.size_bytes
    loaded = mixquant.load_quantized(path, type(model)())
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_asymmetric_mse_clip_with_groups():
    model = conv_linear()
    cfg = mixquant.uniform(model, 3, group_size=16, clip="mse", errors=False)
    q = mixquant.quantize(model, cfg, progress=False)
    layer = q.get_submodule("fc")
    _on_group_grid(layer, 16)
    want, _ = mixquant.choose_qparams(model.fc.weight, 3, clip="mse", group_size=16)
    assert torch.equal(layer.weight_scale, want)
