"""export → load_quantized: packed sizes, bit-exact round trip, bad files and models."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
from _quant_models import TinyMobileNet, TinyResNet, images, tiny_mobilenet, tiny_resnet

import mixquant
from mixquant.io.export import export, load_quantized
from mixquant.api.quantize import quant_info, quantize


def _mixed(model: nn.Module, **kw) -> mixquant.BitConfig:
    names = list(mixquant.find_layers(model))
    return mixquant.uniform(model, 4, keep={n: (2, 3, 5, 7, 8, 16, 1)[i % 7] for i, n in enumerate(names)},
                            errors=False, **kw)


@pytest.mark.parametrize("per_channel", [True, False])
def test_round_trip_bit_exact_and_sizes(tmp_path, per_channel):
    model = tiny_resnet()
    x = images(16)
    cfg = _mixed(model, per_channel=per_channel)
    q = quantize(model, cfg, calib_data=x, act_bits=6, quantize_block_outputs=True, progress=False)
    path = tmp_path / "q.safetensors"
    info = export(q, path)
    assert info.quantized_bytes == cfg.size_bytes == quant_info(q).size_bytes
    assert info.file_bytes == os.path.getsize(path)
    assert info.file_bytes == info.header_bytes + info.packed_weight_bytes + info.qparam_bytes + info.float_bytes
    assert info.float_bytes == quant_info(q).float_bytes
    expected_packed = sum((n * cfg.bits[k] + 7) // 8 for k, n in cfg.num_params.items())
    assert info.packed_weight_bytes == expected_packed
    loaded = load_quantized(path, TinyResNet())
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    assert loaded.mixquant_state.config.bits == cfg.bits
    assert quant_info(loaded).size_bytes == cfg.size_bytes


def test_round_trip_brecq_folded_with_activations(tmp_path):
    model = tiny_mobilenet()
    x = images(16, 16)
    q = quantize(model, mixquant.uniform(model, 3, errors=False), "brecq", calib_data=x, act_bits=4, iters=5,
                 act_iters=5, num_threads=1, progress=False)
    path = tmp_path / "b.safetensors"
    info = export(q, path)
    assert info.quantized_bytes == q.mixquant_state.config.size_bytes
    loaded = load_quantized(path, TinyMobileNet())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loaded.modules())
    assert loaded.mixquant_state.folded_bn == q.mixquant_state.folded_bn
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_file_size_within_one_percent_for_a_larger_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024)).eval()
    cfg = mixquant.uniform(model, 4, errors=False)
    info = export(quantize(model, cfg, progress=False), tmp_path / "l.safetensors")
    assert info.quantized_bytes == cfg.size_bytes
    # the rest is 8 KB of float32 biases and a ~1.5 KB header
    assert info.file_bytes <= 1.01 * cfg.size_bytes


def test_bad_exports_and_loads(tmp_path):
    model = tiny_resnet()
    with pytest.raises(ValueError, match="not quantized"):
        export(model, tmp_path / "x.safetensors")
    q = quantize(model, mixquant.uniform(model, 4, errors=False), progress=False)
    path = tmp_path / "q.safetensors"
    export(q, path)
    with pytest.raises(ValueError, match="does not fit"):
        load_quantized(path, TinyMobileNet())
    with pytest.raises(ValueError, match="does not fit"):
        load_quantized(path, TinyResNet(width=4))
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a mixquant"):
        load_quantized(tmp_path / "plain.safetensors", TinyResNet())
    with torch.no_grad():
        q.layer1[0].conv1.weight.add_(1e-3)
    with pytest.raises(RuntimeError, match="layer1.0.conv1"):
        export(q, tmp_path / "tampered.safetensors")


def test_export_never_clobbers_without_overwrite(tmp_path):
    model = tiny_resnet()
    q = quantize(model, mixquant.uniform(model, 4, errors=False), progress=False)
    path = tmp_path / "q.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        export(q, path)
    assert path.read_bytes() == b"precious"
    info = export(q, path, overwrite=True)
    assert info.file_bytes == path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.safetensors"]
