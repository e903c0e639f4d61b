"""TorchScript models: weight-only asymmetric quantize, export, load and evaluate (API and CLI); the rest refused."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import make_small_net

import mixquant
from mixquant.cli import main
from mixquant.io.models import load_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def script_file(tmp_path):
    path = tmp_path / "net.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(make_small_net()).save(str(path))
    return str(path)


def _scripted(path):
    return load_model(path, trust_file=True)


def test_quantize_replaces_the_weights_of_a_scripted_model(script_file):
    model = _scripted(script_file)
    cfg = mixquant.search(model, avg_bits=4.0)
    q = mixquant.quantize(model, cfg, "asymmetric", progress=False)
    ref = mixquant.quantize(make_small_net(), cfg, "asymmetric", progress=False)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(q(x), ref(x))  # the same grid values as the nn.Module path
        assert not torch.equal(q(x), model(x))  # and the original is untouched
    info, ref_info = mixquant.quant_info(q), mixquant.quant_info(ref)
    assert info.bits == cfg.bits and info.size_bytes == ref_info.size_bytes == cfg.size_bytes
    assert isinstance(q, torch.jit.ScriptModule)


def test_export_and_load_a_scripted_model_bit_exactly(script_file, tmp_path):
    model = _scripted(script_file)
    cfg = mixquant.search(model, avg_bits=3.0)
    q = mixquant.quantize(model, cfg, progress=False)
    path = tmp_path / "q.safetensors"
    info = mixquant.export(q, path)
    assert info.quantized_bytes == cfg.size_bytes
    restored = mixquant.load_quantized(path, _scripted(script_file))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(restored(x), q(x))
    # the same file loads into the nn.Module version of the architecture, and back
    assert torch.equal(mixquant.load_quantized(path, make_small_net())(x), q(x))
    plain = mixquant.quantize(make_small_net(), cfg, progress=False)
    mixquant.export(plain, tmp_path / "p.safetensors")
    with torch.no_grad():
        assert torch.equal(mixquant.load_quantized(tmp_path / "p.safetensors", _scripted(script_file))(x), q(x))


@pytest.mark.parametrize("kwargs, words", [
    ({"method": "brecq", "calib_data": torch.randn(8, 3, 16, 16)}, "method='brecq'"),
    ({"act_bits": 8, "calib_data": torch.randn(8, 3, 16, 16)}, "act_bits=8"),
    ({"fold_bn": True}, "fold_bn"),
])
def test_what_a_scripted_model_cannot_do_is_one_clear_error(script_file, kwargs, words):
    model = _scripted(script_file)
    cfg = mixquant.uniform(model, 4)
    with pytest.raises(ValueError, match="TorchScript") as exc:
        mixquant.quantize(model, cfg, progress=False, **kwargs)
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_cli_quantize_and_evaluate_a_torchscript_file(script_file, tmp_path, capsys):
    cfg = str(tmp_path / "bits.json")
    assert main(["search", script_file, "--avg-bits", "4", "--out", cfg, "--trust-file"]) == 0
    q = str(tmp_path / "q.safetensors")
    assert main(["quantize", script_file, "--config", cfg, "--out", q, "--trust-file"]) == 0
    data = tmp_path / "d.pt"
    x, y = torch.randn(12, 3, 16, 16), torch.randint(0, 10, (12,))
    torch.save({"x": x, "y": y}, data)
    res = str(tmp_path / "e.json")
    assert main(["evaluate", script_file, q, "--data", str(data), "--json", res, "--trust-file"]) == 0
    with open(res) as fh:
        got = json.load(fh)
    ref = mixquant.quantize(make_small_net(), mixquant.BitConfig.load(cfg), progress=False)
    with torch.no_grad():
        agree = (ref(x).argmax(1) == make_small_net()(x).argmax(1)).float().mean().item()
    assert got["agreement"] == pytest.approx(agree)
    capsys.readouterr()
    calib = str(tmp_path / "c.pt")
    torch.save(x, calib)
    assert main(["quantize", script_file, "--config", cfg, "--method", "brecq", "--calib", calib, "--iters", "1",
                 "--out", str(tmp_path / "b.safetensors"), "--trust-file"]) == 2
    err = capsys.readouterr().err
    assert "TorchScript" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
