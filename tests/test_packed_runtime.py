"""load_quantized(..., packed=True): codes stay packed at their bit-width, outputs equal the unpacked model's bit for bit."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn as nn
from _deploy_models import ZOO, mixed_config, tiny_transformer, tokens
from conftest import make_small_net

import mixquant
from mixquant.nn.packed import PACKED_KEY, is_packed_layer, packed_bytes


def _round_trip(tmp_path, model, qmodel, fresh):
    path = tmp_path / "q.safetensors"
    mixquant.export(qmodel, path)
    return mixquant.load_quantized(path, fresh()), mixquant.load_quantized(path, fresh(), packed=True)


def _check_packed(packed, config):
    """Quantized layers hold only packed codes + qparams, exactly config.size_bytes of them, and no float weight."""
    total = 0
    for name, bits in config.bits.items():
        layer = packed.get_submodule(name)
        assert is_packed_layer(layer) and "weight" not in layer._parameters
        n = math.prod(config.shapes[name])
        assert layer._buffers[PACKED_KEY].numel() == (n * bits + 7) // 8
        total += packed_bytes(layer)
    assert total == config.size_bytes
    assert not any(k.endswith(".weight") and k.rsplit(".", 1)[0] in config.bits for k in packed.state_dict())


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_packed_equals_unpacked(tmp_path, name):
    model, x, _ = ZOO[name]()
    config = mixed_config(model)
    q = mixquant.quantize(model, config, progress=False)
    unpacked, packed = _round_trip(tmp_path, model, q, lambda: copy.deepcopy(model))
    _check_packed(packed, config)
    with torch.no_grad():
        assert torch.equal(packed(x), unpacked(x))


@pytest.fixture(scope="module")
def brecq_act(tmp_path_factory):
    model = make_small_net()
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    q = mixquant.quantize(model, mixed_config(model), method="brecq", calib_data=x, act_bits=6, iters=4,
                          act_iters=2, num_samples=8, batch_size=4, progress=False)
    unpacked, packed = _round_trip(tmp_path_factory.mktemp("brecq"), model, q, make_small_net)
    return x, q, unpacked, packed


def test_levels_threads_and_act_quantizers(brecq_act, simd):
    """BRECQ with activation quantizers (pre-hooks kept on packed layers), on each SIMD level, 1 and 2 threads."""
    x, q, unpacked, packed = brecq_act
    _check_packed(packed, q.mixquant_state.config)
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            with torch.no_grad():
                assert torch.equal(packed(x), unpacked(x))
                assert torch.equal(packed(x), q(x))
    finally:
        torch.set_num_threads(threads)


class Mixed(nn.Module):
    """Conv1d, ConvTranspose2d (channel axis 1), Embedding and Linear in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 12)
        self.conv = nn.Conv1d(12, 10, 3, padding=1)
        self.up = nn.ConvTranspose2d(10, 6, 2, stride=2)
        self.fc = nn.Linear(6, 3)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.embed(t).transpose(1, 2))          # [B, 10, T]
        h = self.up(h.unsqueeze(-1))                          # [B, 6, 2T, 2]
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("per_channel", [True, False])
def test_layer_kinds(tmp_path, per_channel):
    def fresh():
        torch.manual_seed(3)
        return Mixed().eval()
    model = fresh()
    config = mixed_config(model, per_channel=per_channel)
    assert set(config.bits) == {"embed", "conv", "up", "fc"}
    q = mixquant.quantize(model, config, progress=False)
    unpacked, packed = _round_trip(tmp_path, model, q, fresh)
    _check_packed(packed, config)
    t = tokens(4, 7)[:, :7] % 20
    with torch.no_grad():
        assert torch.equal(packed(t), unpacked(t))
        for name in config.bits:
            assert torch.equal(packed.get_submodule(name).weight, unpacked.get_submodule(name).weight)
    assert isinstance(packed.up, nn.ConvTranspose2d) and type(packed.up).__name__ == "PackedConvTranspose2d"


def test_transformer_packed(tmp_path):
    model = tiny_transformer()
    config = mixed_config(model)
    q = mixquant.quantize(model, config, progress=False)
    unpacked, packed = _round_trip(tmp_path, model, q, tiny_transformer)
    _check_packed(packed, config)
    with torch.no_grad():
        assert torch.equal(packed(tokens(6)), unpacked(tokens(6)))


def test_copy_pickle_export_and_read_only(tmp_path):
    model = make_small_net()
    q = mixquant.quantize(model, mixed_config(model), progress=False)
    unpacked, packed = _round_trip(tmp_path, model, q, make_small_net)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = unpacked(x)
        assert torch.equal(copy.deepcopy(packed)(x), ref)
        buf = io.BytesIO()
        torch.save(packed, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(x), ref)
    # A packed model exports to the same tensors, and loads back to the same outputs.
    again = tmp_path / "again.safetensors"
    mixquant.export(packed, again)
    with torch.no_grad():
        assert torch.equal(mixquant.load_quantized(again, make_small_net())(x), ref)
    assert mixquant.quant_info(packed).size_bytes == q.mixquant_state.config.size_bytes
    with pytest.raises(AttributeError, match="read-only"):
        packed.fc1.weight = nn.Parameter(torch.zeros(64, 256))
    with pytest.raises(ValueError, match="already quantized"):
        mixquant.quantize(packed, q.mixquant_state.config, progress=False)


def test_bad_arguments(tmp_path):
    model = make_small_net()
    q = mixquant.quantize(model, mixed_config(model), progress=False)
    path = tmp_path / "q.safetensors"
    mixquant.export(q, path)
    with pytest.raises(TypeError, match="packed"):
        mixquant.load_quantized(path, make_small_net(), packed=1)

    class WithMaxNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4, max_norm=1.0)
            self.fc = nn.Linear(4, 2)

        def forward(self, t):
            return self.fc(self.embed(t))

    m = WithMaxNorm().eval()
    q2 = mixquant.quantize(m, mixquant.uniform(m, 4, errors=False, embeddings=True), progress=False)
    path2 = tmp_path / "m.safetensors"
    mixquant.export(q2, path2)
    fresh = WithMaxNorm()
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match="'embed'.*max_norm"):
        mixquant.load_quantized(path2, fresh, packed=True)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())  # untouched
