"""mixquant.export_onnx: QDQ graphs that ONNX Runtime runs with the simulated model's outputs, in the narrowest containers.

Tolerances (stated in README, "Running the result outside mixquant"): weights are
bit-identical after DequantizeLinear, so outputs differ only by the runtime's
summation order: ``|ort - torch| <= 1e-4 * max|torch|`` for the CNNs in ONNX Runtime's
default session. ONNX Runtime fuses 4-bit DequantizeLinear + MatMul into
MatMulNBits, which by default computes with int8 activations: the transformer is
held to ``1e-5`` with ``session.qdq_matmulnbits_accuracy_level = 0`` and to
``1e-2`` (same top-1) in the default session. With activation quantization the
default session runs Q/DQ groups as integer kernels: ``5e-2`` and 90 % top-1
agreement there, ``1e-4`` with ``session.disable_quant_qdq = 1``.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from _deploy_models import ZOO, mixed_config, tiny_transformer, tokens
from conftest import make_small_net

import mixquant
from mixquant.io.onnx_export import _strip_debug_info

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CONTAINER_BITS = {"uint4": 4, "int4": 4, "uint8": 8, "int8": 8, "uint16": 16, "int16": 16}


def _session(path, accuracy_level=None, disable_qdq=False):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if disable_qdq:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    if accuracy_level is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    return ort.InferenceSession(os.fspath(path), so, providers=["CPUExecutionProvider"])


def _run(path, x, **kw):
    s = _session(path, **kw)
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


def _float_export(model, x, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the exporter's internal deprecations
        torch.onnx.export(model, (x,), path, dynamo=True, opset_version=21, external_data=False, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim.AUTO},))
    # Compared without the exporter's per-node debug metadata, which export_onnx drops too.
    model = onnx.load(os.fspath(path))
    _strip_debug_info(model)
    return model.ByteSize(), _tensor_bytes(model)


def _tensor_bytes(model) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def _check_ratio(path, info, float_bytes, float_tensor_bytes):
    """Tensor data is exactly the float export's with each quantized weight in its container; the file adds
    the DequantizeLinear nodes and their value types (under 1 KB a layer)."""
    q = onnx.load(os.fspath(path))
    delta = sum(4 * v.numel - v.container_bytes - v.qparam_bytes for v in info.layers.values())
    assert _tensor_bytes(q) == float_tensor_bytes - delta
    implied = float_bytes - delta
    assert 0 <= info.file_bytes - implied <= 1024 * len(info.layers)
    return implied / float_bytes, info.file_bytes / float_bytes


def _check_initializers(path, info, config):
    """Each layer's codes are one initializer of its container type, holding exactly container_bytes."""
    model = onnx.load(os.fspath(path))
    inits = {t.name: t for t in model.graph.initializer}
    for name, layer in info.layers.items():
        assert layer.bits == config.bits[name]
        assert CONTAINER_BITS[layer.container] == (4 if layer.bits <= 4 else 8 if layer.bits <= 8 else 16)
        t = inits[f"{name}.weight_codes"]
        assert onnx.TensorProto.DataType.Name(t.data_type).lower() == layer.container
        assert len(t.raw_data) == layer.container_bytes == (layer.numel * CONTAINER_BITS[layer.container] + 7) // 8
        assert f"{name}.weight" not in inits
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == len(config.bits)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_cnns_in_onnxruntime(tmp_path, name):
    model, x, _ = ZOO[name]()
    config = mixed_config(model)
    q = mixquant.quantize(model, config, progress=False)
    path = tmp_path / "q.onnx"
    info = mixquant.export_onnx(q, path, x[:2])
    assert info.file_bytes == os.path.getsize(path)
    _check_initializers(path, info, config)
    got = _run(path, x)
    with torch.no_grad():
        ref = q(x).numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).all()
    if name.startswith("mnist"):  # no batch norm (which the float export folds): the same tensors in float32
        implied, actual = _check_ratio(path, info, *_float_export(model, x[:2], tmp_path / "f.onnx"))
        assert actual < 0.25 and abs(actual - implied) < 0.01


def test_transformer_in_onnxruntime(tmp_path):
    model = tiny_transformer()
    x = tokens(16)
    config = mixed_config(model)
    q = mixquant.quantize(model, config, progress=False)
    path = tmp_path / "t.onnx"
    info = mixquant.export_onnx(q, path, x[:2])
    _check_initializers(path, info, config)
    with torch.no_grad():
        ref = q(x).numpy()
    exact = _run(path, x, accuracy_level=0)
    assert np.abs(exact - ref).max() <= 1e-5 * np.abs(ref).max()
    default = _run(path, x)
    assert np.abs(default - ref).max() <= 1e-2 * np.abs(ref).max()
    assert (exact.argmax(1) == ref.argmax(1)).all() and (default.argmax(1) == ref.argmax(1)).all()
    _check_ratio(path, info, *_float_export(model, x[:2], tmp_path / "f.onnx"))


@pytest.mark.parametrize("symmetric", [False, True])
def test_activations_per_tensor_and_signed_containers(tmp_path, symmetric):
    """act_bits as Q/DQ pairs (6 bits: a Clip before a uint8 QuantizeLinear), per-tensor weights, int4/int8 when symmetric."""
    model = make_small_net()
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    config = mixed_config(model, per_channel=False, symmetric=symmetric)
    q = mixquant.quantize(model, config, calib_data=x, act_bits=6, progress=False)
    path = tmp_path / "a.onnx"
    info = mixquant.export_onnx(q, path, x[:2])
    containers = {v.container for v in info.layers.values()}
    assert containers == ({"int4", "int8"} if symmetric else {"uint4", "uint8"})
    graph = onnx.load(os.fspath(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") == len(q.mixquant_state.input_act_bits)
    narrow = [b for b in q.mixquant_state.input_act_bits.values() if b < 8]  # the first layer's input has 8
    assert ops.count("Clip") == len(narrow) > 0
    with torch.no_grad():
        ref = q(x).numpy()
    # ONNX Runtime's QDQ fusions run Q/DQ groups as integer kernels (QLinearConv, QGemm: bias rounded to
    # int32 at scale s_x * s_w, outputs requantized): close to the simulation, not equal. Without them the
    # graph computes the simulation's numbers.
    exact = _run(path, x, disable_qdq=True)
    assert np.abs(exact - ref).max() <= 1e-4 * np.abs(ref).max()
    default = _run(path, x)
    assert np.abs(default - ref).max() <= 5e-2 * np.abs(ref).max()
    assert (default.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_packed_model_and_overhead(tmp_path):
    """A model loaded packed exports the same graph; 2-3-bit layers report what their 4-bit cells cost."""
    model = make_small_net()
    config = mixquant.uniform(model, 2, errors=False)
    q = mixquant.quantize(model, config, progress=False)
    st = tmp_path / "q.safetensors"
    mixquant.export(q, st)
    packed = mixquant.load_quantized(st, make_small_net(), packed=True)
    x = torch.randn(4, 3, 16, 16)
    info = mixquant.export_onnx(packed, tmp_path / "p.onnx", x)
    for v in info.layers.values():
        assert v.container == "uint4" and v.overhead_bytes == v.container_bytes - (v.numel * 2 + 7) // 8 > 0
    assert info.overhead_bytes == sum(v.overhead_bytes for v in info.layers.values())
    assert "2" in info.table() and "uint4" in info.table()
    with torch.no_grad():
        ref = q(x).numpy()
    assert np.abs(_run(tmp_path / "p.onnx", x) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_errors(tmp_path):
    model = make_small_net()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="not quantized"):
        mixquant.export_onnx(model, tmp_path / "m.onnx", x)
    q = mixquant.quantize(model, mixquant.uniform(model, 4, errors=False), progress=False)
    with pytest.raises(ValueError, match="opset"):
        mixquant.export_onnx(q, tmp_path / "m.onnx", x, opset=17)
    with pytest.raises(TypeError, match="example_inputs"):
        mixquant.export_onnx(q, tmp_path / "m.onnx", [])
    (tmp_path / "exists.onnx").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        mixquant.export_onnx(q, tmp_path / "exists.onnx", x)
    assert (tmp_path / "exists.onnx").read_bytes() == b"keep"
    with torch.no_grad():
        q.fc2.weight.add_(1e-3)
    with pytest.raises(RuntimeError, match="grid"):
        mixquant.export_onnx(q, tmp_path / "m.onnx", x)


def test_cli_format_onnx(tmp_path, capsys):
    from mixquant.cli import main

    cfg = tmp_path / "bits.json"
    assert main(["search", "conftest:make_small_net", "--avg-bits", "4", "--out", str(cfg)]) == 0
    out = tmp_path / "q.onnx"
    assert main(["quantize", "conftest:make_small_net", "--config", str(cfg), "--format", "onnx",
                 "--input-shape", "2,3,16,16", "--out", str(out)]) == 0
    assert "container" in capsys.readouterr().out
    x = torch.randn(5, 3, 16, 16)
    model = make_small_net()
    q = mixquant.quantize(model, mixquant.BitConfig.load(cfg), progress=False)
    with torch.no_grad():
        ref = q(x).numpy()
    assert np.abs(_run(out, x) - ref).max() <= 1e-4 * np.abs(ref).max()
    # No example input: a clear error, not a traceback; an existing file is kept.
    assert main(["quantize", "conftest:make_small_net", "--config", str(cfg), "--format", "onnx",
                 "--out", str(tmp_path / "r.onnx")]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert main(["quantize", "conftest:make_small_net", "--config", str(cfg), "--format", "onnx",
                 "--input-shape", "2,3,x", "--out", str(tmp_path / "r.onnx")]) == 2
