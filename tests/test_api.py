"""Public API surface: the compiled core is there, the stub matches it, bad input gets clear errors."""

from __future__ import annotations

import ast
import os

import numpy as np
import pytest
import torch

import mixquant
from mixquant import _core


def test_native_core_is_built_and_reports_its_level():
    assert mixquant.get_backend() in ("native", "reference")
    levels = mixquant.supported_simd_levels()
    assert levels[0] == "scalar"
    assert mixquant.simd_level() in levels
    with mixquant.use_simd_level("scalar"):
        assert mixquant.simd_level() == "scalar"
    with pytest.raises(ValueError):
        mixquant.set_simd_level("sse9")


def test_stub_lists_exactly_the_core_functions():
    stub = os.path.join(os.path.dirname(mixquant.__file__), "_core.pyi")
    with open(stub) as fh:
        tree = ast.parse(fh.read())
    stubbed = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    public = {name for name in dir(_core) if not name.startswith("_")}
    assert stubbed == public


def test_all_names_exist():
    for name in mixquant.__all__:
        assert hasattr(mixquant, name), name


def test_backend_switch():
    w = torch.randn(8, 40)
    with mixquant.use_backend("reference"):
        assert mixquant.get_backend() == "reference"
        ref = mixquant.roundoff_error(w)
    assert mixquant.get_backend() == "native"
    nat = mixquant.roundoff_error(w)
    np.testing.assert_allclose(nat.sse, ref.sse, rtol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        mixquant.set_backend("cuda")


def test_thread_count_resolution(monkeypatch):
    w = torch.randn(64, 500)
    base = mixquant.roundoff_error(w, per_channel=True, num_threads=1)
    monkeypatch.setenv("MIXQUANT_NUM_THREADS", "2")
    np.testing.assert_array_equal(mixquant.roundoff_error(w, per_channel=True).channel_sse, base.channel_sse)
    monkeypatch.setenv("MIXQUANT_NUM_THREADS", "zero")
    with pytest.raises(ValueError, match="MIXQUANT_NUM_THREADS"):
        mixquant.roundoff_error(w)
    with pytest.raises(ValueError, match="num_threads"):
        mixquant.roundoff_error(w, num_threads=0)


def test_roundoff_error_fields():
    w = torch.randn(6, 50)
    r = mixquant.roundoff_error(w, [2, 4, 8], per_channel=True)
    assert r.bits.tolist() == [2, 4, 8]
    assert r.scale.shape == (3, 6) and r.zero_point.shape == (3, 6)
    assert r.sse.dtype == np.float64 and np.all(np.diff(r.sse) < 0)
    np.testing.assert_allclose(r.mse, r.sse / w.numel())
    np.testing.assert_allclose(r.norm, r.sse / float((w.double() ** 2).sum()), rtol=1e-6)
    assert mixquant.roundoff_error(w, [4]).scale.shape == (1, 1)
    assert mixquant.roundoff_error(w, 4, clip="mse").sse[0] <= mixquant.roundoff_error(w, 4).sse[0] * (1 + 1e-6)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize(
    "tensor, kwargs, exc, match",
    [
        (torch.tensor([[1.0, float("nan")]]), {}, ValueError, "non-finite"),
        (torch.tensor([[1.0, float("inf")]]), {}, ValueError, "non-finite"),
        (torch.empty(0, 4), {}, ValueError, "empty"),
        (torch.ones(3, 3, dtype=torch.int32), {}, TypeError, "floating-point"),
        (np.ones((3, 3), dtype=np.float32), {}, TypeError, "torch.Tensor"),
        (torch.ones(3, 3), {"bits": [0, 4]}, ValueError, "1..16"),
        (torch.ones(3, 3), {"bits": [17]}, ValueError, "1..16"),
        (torch.ones(3, 3), {"bits": []}, ValueError, "empty"),
        (torch.ones(3, 3), {"bits": [True]}, TypeError, "bits"),
        (torch.ones(3, 3), {"clip": "max"}, ValueError, "clip"),
        (torch.ones(3, 3), {"clip": "mse", "n_grid": 0}, ValueError, "n_grid"),
        (torch.ones(3, 3), {"clip": "mse", "step": 0.5, "n_grid": 80}, ValueError, "step"),
        (torch.ones(3, 3), {"clip": "mse", "p": -1.0}, ValueError, "p must"),
        (torch.ones(3, 3), {"ch_axis": 5}, ValueError, "ch_axis"),
    ],
)
def test_bad_input_raises(backend, tensor, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        mixquant.roundoff_error(tensor, backend=backend, name="w", **kwargs)


def test_bad_kernel_arguments():
    w = torch.randn(4, 10)
    scale, zp = mixquant.choose_qparams(w, 4)
    with pytest.raises(ValueError, match="scale and zero_point"):
        mixquant.fake_quantize_tensor(w, scale[:3], zp[:3], 4)
    with pytest.raises(ValueError, match="scale must be finite"):
        mixquant.fake_quantize_tensor(w, torch.zeros(4), zp, 4)
    with pytest.raises(ValueError, match="codes must"):
        mixquant.pack_bits(np.array([0, 16]), 4)
    with pytest.raises(TypeError, match="integers"):
        mixquant.pack_bits(np.array([0.5]), 4)
    with pytest.raises(ValueError, match="bytes"):
        mixquant.unpack_bits(np.zeros(1, np.uint8), 4, 3)
    with pytest.raises(TypeError, match="codes"):
        mixquant.dequantize_tensor(w, scale, zp)


def test_native_binding_validates_raw_calls():
    w = np.zeros((2, 3), np.float32)
    s = np.ones((1, 2), np.float32)
    z = np.zeros((1, 2), np.int32)
    with pytest.raises(ValueError):
        _core.error_table(w, s, z, np.array([], np.int32), 1)
    with pytest.raises(ValueError):
        _core.error_table(w, np.ones((1, 3), np.float32), np.zeros((1, 3), np.int32), np.array([4], np.int32), 1)
    with pytest.raises(ValueError):
        _core.error_table(w, s, z, np.array([4], np.int32), 0)
    with pytest.raises(ValueError):
        _core.qparams(np.zeros(2, np.float32), np.zeros(3, np.float32), 4, False)
