"""load_quantized(..., packed="fused"): one-row Linear inputs go through the fused kernel, everything else stays bit-exact.

A fused output is held to the kernel's bound against the exact (float64) product
of the stored codes, plus the unpacked model's own float32 error (each weight
rounded, then a float32 sum in BLAS's order, at most ``(K + 1) * 2**-24 *
sum |w| |x|``): the two cannot be bit-identical. Whole models on one token agree
within 1e-4 of their output range and in their argmax.
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from _deploy_models import mixed_config, tiny_transformer, tokens
from conftest import make_small_net

import mixquant
import mixquant.nn.packed as packed_mod
from mixquant.core.kernels import MATVEC_TOLERANCE
from mixquant.nn.packed import is_fused_layer, is_packed_layer


@pytest.fixture
def spy(monkeypatch):
    """Counts the fused kernel's calls from packed layers."""
    calls = []
    real = packed_mod.matvec_packed

    def counted(*args, **kw):
        calls.append(args[2:4])
        return real(*args, **kw)

    monkeypatch.setattr(packed_mod, "matvec_packed", counted)
    return calls


def _load(tmp_path, model, fresh, config=None):
    q = mixquant.quantize(model, config or mixed_config(model), progress=False)
    path = tmp_path / "q.safetensors"
    mixquant.export(q, path, overwrite=True)
    return (q, mixquant.load_quantized(path, fresh()), mixquant.load_quantized(path, fresh(), packed=True),
            mixquant.load_quantized(path, fresh(), packed="fused"))


def _linear_bound(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Kernel bound against the float64 product + the float32 error of x @ w.T + bias with the decoded weight."""
    b = layer._buffers
    n = layer.in_features * layer.out_features
    codes = torch.from_numpy(mixquant.unpack_bits(b["weight_packed"].numpy(), layer.mixquant_bits, n).astype(np.float64))
    codes = codes.view(layer.out_features, layer.in_features)
    s = b["weight_scale"].double().view(-1, 1)
    z = b["weight_zero_point"].double().view(-1, 1)
    ax = x.double().abs().reshape(-1)
    w = layer.weight.double()
    y = (w @ x.double().reshape(-1)) + (layer.bias.double() if layer.bias is not None else 0)
    k = layer.in_features
    return (MATVEC_TOLERANCE[0] * (((codes + z) * s) @ ax) + MATVEC_TOLERANCE[1] * y.abs()
            + (k + 2) * 2.0**-24 * (w.abs() @ ax + (layer.bias.double().abs() if layer.bias is not None else 0)))


def test_one_row_linear_within_bound(tmp_path, simd, spy):
    torch.manual_seed(0)

    def fresh():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(257, 96), nn.ReLU(), nn.Linear(96, 40, bias=False)).eval()

    for per_channel in (True, False):
        model = fresh()
        config = mixed_config(model, per_channel=per_channel)
        _, unpacked, packed, fused = _load(tmp_path, model, fresh, config)
        assert all(is_fused_layer(fused[i]) for i in (0, 2)) and not is_fused_layer(packed[0])
        for shape in ((257,), (1, 257), (1, 1, 257)):
            x = torch.randn(shape)
            spy.clear()
            with torch.no_grad():
                h_f, h_u = fused[0](x), unpacked[0](x)
                assert spy == [(96, 257)] and h_f.shape == h_u.shape == (*shape[:-1], 96)
                assert ((h_f - h_u).abs().double().reshape(-1) <= _linear_bound(fused[0], x)).all()
                assert torch.equal(packed[0](x), h_u)
                h = torch.relu(h_u)
                assert ((fused[2](h) - unpacked[2](h)).abs().double().reshape(-1) <= _linear_bound(fused[2], h)).all()


def test_other_inputs_stay_bit_exact(tmp_path, spy):
    def fresh():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(33, 20), nn.Tanh(), nn.Linear(20, 7)).eval()

    _, unpacked, _, fused = _load(tmp_path, fresh(), fresh)
    with torch.no_grad():
        for x in (torch.randn(2, 33), torch.randn(3, 1, 33), torch.randn(0, 33)):
            assert torch.equal(fused(x), unpacked(x))
        x64 = torch.randn(1, 33, dtype=torch.float64)
        with pytest.raises(RuntimeError):  # a float64 input is refused as by the unpacked model (float32 weights)
            unpacked(x64)
        with pytest.raises(RuntimeError):
            fused(x64)
        with mixquant.use_backend("reference"):
            x = torch.randn(1, 33)
            assert torch.equal(fused(x), unpacked(x))
    assert spy == []
    # An input that needs a gradient: the decode path, gradients reach the input.
    x = torch.randn(1, 33, requires_grad=True)
    y = fused(x)
    assert torch.equal(y, unpacked(x)) and spy == []
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    # While tracing, the fused kernel is not called (its call would not be recorded).
    with warnings.catch_warnings():  # torch.jit.trace is deprecated, and still used
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(fused, torch.randn(1, 33), check_trace=False)
    assert spy == []


def test_transformer_one_token(tmp_path, spy):
    q, unpacked, packed, fused = _load(tmp_path, tiny_transformer(), tiny_transformer)
    linears = [n for n, m in fused.named_modules() if isinstance(m, nn.Linear)]
    assert linears and all(is_fused_layer(fused.get_submodule(n)) for n in linears)
    assert not is_fused_layer(fused.embed) and is_packed_layer(fused.embed)
    with torch.no_grad():
        t = tokens(16, 1)                       # 16 sequences of one token: every Linear sees 16 rows
        assert torch.equal(fused(t), unpacked(t))
        assert spy == []
        for i in range(16):                     # batch 1 x 1 token: every Linear takes the fused kernel
            ref = unpacked(t[i:i + 1])
            got = fused(t[i:i + 1])
            assert torch.equal(packed(t[i:i + 1]), ref)
            assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
            assert got.argmax() == ref.argmax()
        assert len(spy) == 16 * len(linears)
        assert torch.equal(fused(tokens(2, 6)), unpacked(tokens(2, 6)))


def test_only_plain_linears_fuse(tmp_path):
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 6, 3)
            self.mine = MyLinear(6, 5)
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(self.mine(self.conv(x).mean(-1)))

    def fresh():
        torch.manual_seed(2)
        return Net().eval()

    _, unpacked, _, fused = _load(tmp_path, fresh(), fresh)
    assert is_fused_layer(fused.fc) and type(fused.fc).__name__ == "FusedLinear"
    assert is_packed_layer(fused.mine) and not is_fused_layer(fused.mine)
    assert is_packed_layer(fused.conv) and not is_fused_layer(fused.conv)
    x = torch.randn(1, 4, 9)
    with torch.no_grad():
        assert torch.allclose(fused(x), unpacked(x), rtol=1e-5, atol=1e-6)
        h = torch.randn(1, 6)
        assert torch.equal(fused.mine(h), unpacked.mine(h))    # its own forward, on the decoded weight


def test_copy_pickle_export_keep_fused(tmp_path):
    model = make_small_net()
    q, unpacked, _, fused = _load(tmp_path, model, make_small_net)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ref = fused(x)
        copied = copy.deepcopy(fused)
        assert is_fused_layer(copied.fc1) and torch.equal(copied(x), ref)
        buf = io.BytesIO()
        torch.save(fused, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert is_fused_layer(loaded.fc2) and torch.equal(loaded(x), ref)
        assert torch.allclose(ref, unpacked(x), rtol=1e-4, atol=1e-5 * unpacked(x).abs().max().item())
    again = tmp_path / "again.safetensors"
    mixquant.export(fused, again)
    with torch.no_grad():
        assert torch.equal(mixquant.load_quantized(again, make_small_net())(x), unpacked(x))
    with pytest.raises(AttributeError, match="read-only"):
        fused.fc1.weight = nn.Parameter(torch.zeros(64, 256))


def test_bad_packed_values(tmp_path):
    model = make_small_net()
    q = mixquant.quantize(model, mixed_config(model), progress=False)
    path = tmp_path / "q.safetensors"
    mixquant.export(q, path)
    with pytest.raises(ValueError, match="'fused'"):
        mixquant.load_quantized(path, make_small_net(), packed="fuse")
    with pytest.raises(TypeError, match="packed"):
        mixquant.load_quantized(path, make_small_net(), packed=None)
