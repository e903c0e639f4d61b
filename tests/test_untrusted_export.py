"""load_quantized on untrusted files: every damaged or inconsistent file is a clear ValueError.

Never a crash, never another exception type, never a model with silently
wrong weights.  Each case starts from a valid exported file and breaks one
thing: the raw bytes (truncation, random bytes, header length), the
safetensors header (dtype, shape, offsets), the tensors (dtype, shape, length,
values) or the metadata (bits, shape, channel axis, config).
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct

import pytest
import torch
from _quant_models import TinyResNet, tiny_resnet

import mixquant
from mixquant.io.export import export, load_quantized
from mixquant.api.quantize import quantize

safetensors_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_resnet()
    names = list(mixquant.find_layers(model))
    cfg = mixquant.uniform(model, 4, keep={n: (2, 3, 5, 8, 16)[i % 5] for i, n in enumerate(names)}, errors=False)
    q = quantize(model, cfg, progress=False)
    path = tmp_path_factory.mktemp("export") / "q.safetensors"
    export(q, path)
    return path, names


def _read(path):
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata())


def _rewrite(src, dst, edit_tensors=None, edit_meta=None):
    tensors, meta = _read(src)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    safetensors_torch.save_file(tensors, str(dst), metadata=meta)
    return dst


def _header(raw: bytes):
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8:8 + n])


def _with_header(raw: bytes, header: dict) -> bytes:
    n, _ = _header(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def _expect_value_error(path):
    with pytest.raises(ValueError):
        load_quantized(path, TinyResNet())


# ------------------------------------------------------------- raw bytes ----
def test_valid_file_loads(exported):
    path, _ = exported
    load_quantized(path, TinyResNet())


@pytest.mark.parametrize("cut", [0, 4, 8, 20, 0.3, 0.6, 0.95, -1])
def test_truncated_file(exported, tmp_path, cut):
    raw = exported[0].read_bytes()
    n = cut if isinstance(cut, int) and cut >= 0 else int(len(raw) * cut) if cut > 0 else len(raw) - 1
    bad = tmp_path / "t.safetensors"
    bad.write_bytes(raw[:n])
    _expect_value_error(bad)


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes(tmp_path, seed):
    rng = random.Random(seed)
    bad = tmp_path / "r.safetensors"
    bad.write_bytes(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 5000))))
    _expect_value_error(bad)


@pytest.mark.parametrize("length", [2**63 - 1, 2**40, 10**9])
def test_oversized_header_length(exported, tmp_path, length):
    raw = exported[0].read_bytes()
    bad = tmp_path / "h.safetensors"
    bad.write_bytes(struct.pack("<Q", length) + raw[8:])
    _expect_value_error(bad)


def test_oversized_trailing_data(exported, tmp_path):
    bad = tmp_path / "big.safetensors"
    bad.write_bytes(exported[0].read_bytes() + b"\0" * (1 << 20))
    _expect_value_error(bad)


def test_not_a_safetensors_file(tmp_path):
    bad = tmp_path / "torch.pt"
    torch.save(TinyResNet().state_dict(), bad)
    _expect_value_error(bad)


# ------------------------------------------------------ header consistency ----
def _packed_key(path):
    return next(k for k in _header(path.read_bytes())[1] if k.endswith("weight.packed"))


@pytest.mark.parametrize(
    "edit",
    [
        "packed_dtype_f32",
        "packed_shape_longer",
        "offsets_past_end",
        "offsets_overlap",
        "offsets_reversed",
        "scale_dtype_i32",
        "shape_negative",
    ],
)
def test_header_inconsistent(exported, tmp_path, edit):
    path = exported[0]
    raw = path.read_bytes()
    _, header = _header(raw)
    key = _packed_key(path)
    scale_key = key.replace("weight.packed", "weight_scale")
    entry = header[key]
    begin, end = entry["data_offsets"]
    if edit == "packed_dtype_f32":
        entry["dtype"] = "F32"
        entry["shape"] = [(end - begin) // 4]
    elif edit == "packed_shape_longer":
        entry["shape"] = [entry["shape"][0] + 1]
    elif edit == "offsets_past_end":
        entry["data_offsets"] = [begin, end + 10**6]
    elif edit == "offsets_overlap":
        other = next(k for k in header if k not in ("__metadata__", key))
        header[other]["data_offsets"] = [begin, begin + (header[other]["data_offsets"][1] - header[other]["data_offsets"][0])]
    elif edit == "offsets_reversed":
        entry["data_offsets"] = [end, begin]
    elif edit == "scale_dtype_i32":
        header[scale_key]["dtype"] = "I32"
    elif edit == "shape_negative":
        entry["shape"] = [-1]
    bad = tmp_path / "h.safetensors"
    bad.write_bytes(_with_header(raw, header))
    _expect_value_error(bad)


# ------------------------------------------------------------- tensors ------
def _first(names):
    return names[0] + "."


TENSOR_EDITS = {
    "packed_too_short": lambda t, p: t.__setitem__(p + "weight.packed", t[p + "weight.packed"][:-1].clone()),
    "packed_too_long": lambda t, p: t.__setitem__(p + "weight.packed",
                                                  torch.cat([t[p + "weight.packed"], torch.zeros(3, dtype=torch.uint8)])),
    "packed_int64": lambda t, p: t.__setitem__(p + "weight.packed", t[p + "weight.packed"].to(torch.int64)),
    "packed_2d": lambda t, p: t.__setitem__(p + "weight.packed", t[p + "weight.packed"].reshape(1, -1)),
    "packed_missing": lambda t, p: t.pop(p + "weight.packed"),
    "scale_missing": lambda t, p: t.pop(p + "weight_scale"),
    "scale_float64": lambda t, p: t.__setitem__(p + "weight_scale", t[p + "weight_scale"].double()),
    "scale_wrong_len": lambda t, p: t.__setitem__(p + "weight_scale", torch.ones(t[p + "weight_scale"].numel() + 1)),
    "scale_nan": lambda t, p: t[p + "weight_scale"].__setitem__(0, float("nan")),
    "scale_inf": lambda t, p: t[p + "weight_scale"].__setitem__(0, float("inf")),
    "scale_negative": lambda t, p: t[p + "weight_scale"].__setitem__(0, -1.0),
    "scale_zero": lambda t, p: t[p + "weight_scale"].__setitem__(0, 0.0),
    "zero_point_float": lambda t, p: t.__setitem__(p + "weight_zero_point", t[p + "weight_zero_point"].float() + 0.5),
    "zero_point_out_of_range": lambda t, p: t[p + "weight_zero_point"].__setitem__(0, 1 << 20),
    "zero_point_negative": lambda t, p: t[p + "weight_zero_point"].__setitem__(0, -3),
    "zero_point_wrong_len": lambda t, p: t.__setitem__(p + "weight_zero_point", torch.zeros(1000, dtype=torch.int32)),
    "bias_wrong_shape": lambda t, p: t.__setitem__(next(k for k in t if k.endswith(".bias") or k.endswith("running_mean")),
                                                   torch.zeros(1234)),
    "unexpected_tensor": lambda t, p: t.__setitem__("evil.extra", torch.zeros(3)),
}


@pytest.mark.parametrize("edit", list(TENSOR_EDITS))
def test_bad_tensors(exported, tmp_path, edit):
    path, names = exported
    bad = _rewrite(path, tmp_path / "t.safetensors", edit_tensors=lambda t: TENSOR_EDITS[edit](t, _first(names)))
    _expect_value_error(bad)


# ------------------------------------------------------------ metadata ------
def _edit_layers(fn):
    def edit(meta):
        layers = json.loads(meta["layers"])
        fn(layers[next(iter(layers))])
        meta["layers"] = json.dumps(layers)
    return edit


META_EDITS = {
    "format": lambda m: m.update(format="other"),
    "version": lambda m: m.update(version="99"),
    "config_not_json": lambda m: m.update(config="{not json"),
    "config_tampered": lambda m: m.update(config=m["config"].replace('"bits": 2', '"bits": 0', 1)),
    "layers_missing": lambda m: m.pop("layers"),
    "layers_not_object": lambda m: m.update(layers="[1, 2]"),
    "layer_bits_0": _edit_layers(lambda s: s.update(bits=0)),
    "layer_bits_17": _edit_layers(lambda s: s.update(bits=17)),
    "layer_bits_str": _edit_layers(lambda s: s.update(bits="4")),
    "layer_bits_disagree_with_config": _edit_layers(lambda s: s.update(bits=s["bits"] % 16 + 1)),
    "layer_shape_wrong": _edit_layers(lambda s: s.update(shape=[s["shape"][0] * 2] + s["shape"][1:])),
    "layer_shape_huge": _edit_layers(lambda s: s.update(shape=[2**40, 2**40])),
    "layer_ch_axis_5": _edit_layers(lambda s: s.update(ch_axis=5)),
    "layer_ch_axis_str": _edit_layers(lambda s: s.update(ch_axis="0")),
    "layer_unknown_name": lambda m: m.update(layers=json.dumps({"no.such.layer": {"bits": 4, "shape": [2, 2],
                                                                                  "ch_axis": 0}})),
    "act_bits_bad": lambda m: m.update(input_act_bits=json.dumps({"conv1": 99})),
    "act_bits_1": lambda m: m.update(act_bits="1"),  # quantize refuses 1-bit activations: so must the loader
    "input_act_bits_1": lambda m: m.update(input_act_bits=json.dumps({"conv1": 1})),
    "folded_bn_bad": lambda m: m.update(folded_bn=json.dumps([["nope", "nope"]])),
    "requested_bits_bad": lambda m: m.update(requested_bits=json.dumps({"conv1": "x"})),
}


@pytest.mark.parametrize("edit", list(META_EDITS))
def test_bad_metadata(exported, tmp_path, edit):
    path, _ = exported
    bad = _rewrite(path, tmp_path / "m.safetensors", edit_meta=META_EDITS[edit])
    _expect_value_error(bad)


def test_failed_load_leaves_no_half_loaded_model(exported, tmp_path):
    # A file that fails late (bad scale) must not leave the caller's model quantized.
    path, names = exported
    bad = _rewrite(path, tmp_path / "late.safetensors",
                   edit_tensors=lambda t: t[names[-1] + ".weight_scale"].__setitem__(0, float("nan")))
    model = TinyResNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        load_quantized(bad, model)
    assert not hasattr(model, "mixquant_state")
    after = model.state_dict()
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)


def test_directory_and_missing_file(tmp_path):
    with pytest.raises((ValueError, FileNotFoundError, IsADirectoryError)):
        load_quantized(tmp_path / "missing.safetensors", TinyResNet())
    with pytest.raises(ValueError):
        load_quantized(tmp_path, TinyResNet())
    assert os.path.isdir(tmp_path)


# ------------------------------------ activation quantizers, folds, values ----
@pytest.fixture(scope="module")
def exported_act(tmp_path_factory):
    """A MobileNet-shaped model with folded BNs and input and block-output activation quantizers."""
    from _quant_models import images, tiny_mobilenet

    model = tiny_mobilenet()
    q = quantize(model, mixquant.uniform(model, 4), act_bits=8, calib_data=images(16), fold_bn=True,
                 quantize_block_outputs=True, progress=False)
    path = tmp_path_factory.mktemp("export_act") / "qa.safetensors"
    export(q, path)
    return path


def _load_act(path):
    from _quant_models import TinyMobileNet

    return load_quantized(path, TinyMobileNet())


def _set_first(suffix, value):
    def edit(t):
        key = next(k for k in sorted(t) if k.endswith(suffix))
        t[key] = torch.full_like(t[key], value)
    return edit


ACT_EDITS = {  # each used to load and give NaN or different outputs
    **{f"input scale {v}": _set_first("input_quantizer.scale", v) for v in (float("nan"), float("inf"), 0.0, -1.0)},
    **{f"input zero point {v}": _set_first("input_quantizer.zero_point", v) for v in (float("nan"), 1e9, 3.7, -1.0)},
    **{f"output scale {v}": _set_first("output_quantizer.scale", v) for v in (float("nan"), 0.0)},
    **{f"output zero point {v}": _set_first("output_quantizer.zero_point", v) for v in (256.0, 0.5)},
    "NaN bias": _set_first("classifier.bias", float("nan")),
    "Inf bias": _set_first("features.0.0.bias", float("-inf")),
}


@pytest.mark.parametrize("edit", list(ACT_EDITS))
def test_tampered_values_are_refused(exported_act, tmp_path, edit):
    assert _load_act(exported_act) is not None
    bad = _rewrite(exported_act, tmp_path / "a.safetensors", edit_tensors=ACT_EDITS[edit])
    with pytest.raises(ValueError):
        _load_act(bad)


def test_negative_running_var_is_refused(exported, tmp_path):
    # Used to load, and give NaN outputs.
    bad = _rewrite(exported[0], tmp_path / "v.safetensors", edit_tensors=_set_first("bn1.running_var", -1.0))
    with pytest.raises(ValueError, match="running_var"):
        load_quantized(bad, TinyResNet())


def _edit_folds(fn):
    def edit(meta):
        meta["folded_bn"] = json.dumps(fn(json.loads(meta["folded_bn"])))
    return edit


FOLD_EDITS = {
    # used to replace the ReLU6 with Identity silently
    "bn is a ReLU6": lambda f: [["features.0.0", "features.0.2"]] + f[1:],
    # used to give AttributeError
    "bn is a Conv": lambda f: [["features.0.0", "features.1.conv.0"]] + f[1:],
    "layer is an activation": lambda f: [["features.0.2", "features.0.1"]] + f[1:],
    "bn twice": lambda f: f + [f[0]],
    "channel count differs": lambda f: [["features.0.0", "features.1.conv.1"]] + f[1:],
}


@pytest.mark.parametrize("edit", list(FOLD_EDITS))
def test_folded_bn_names_are_checked_against_the_model(exported_act, tmp_path, edit):
    bad = _rewrite(exported_act, tmp_path / "f.safetensors", edit_meta=_edit_folds(FOLD_EDITS[edit]))
    with pytest.raises(ValueError, match="folded batch norms"):
        _load_act(bad)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(input_act_bits=json.dumps({"features.0.2": 8})), "not a quantized layer"),
    (lambda m: m.update(output_act_bits=json.dumps({"classifier": 8})), "not a block"),
    (lambda m: m.update(output_act_bits=json.dumps({"features.0.2": 8})), "not a block"),
])
def test_activation_quantizer_owners_are_checked(exported_act, tmp_path, edit, match):
    bad = _rewrite(exported_act, tmp_path / "o.safetensors", edit_meta=edit)
    with pytest.raises(ValueError, match=match):
        _load_act(bad)


@pytest.mark.parametrize("edit, match", [
    (_edit_layers(lambda s: s.update(ch_axis=1)), "channel axis"),  # a valid-looking axis of the wrong kind
    (_edit_layers(lambda s: s.update(dtype="float16")), "float16"),
])
def test_layer_metadata_is_checked_against_the_layer(exported, tmp_path, edit, match):
    bad = _rewrite(exported[0], tmp_path / "l.safetensors", edit_meta=edit)
    with pytest.raises(ValueError, match=match):
        load_quantized(bad, TinyResNet())


# ------------------------------------------------------- nesting, FIFOs -----
DEEP = "[" * 200_000 + "]" * 200_000


@pytest.mark.parametrize("key", ["config", "folded_bn", "layers", "input_act_bits"])
def test_deeply_nested_metadata_is_a_value_error(exported, tmp_path, capsys, key):
    # Used to: RecursionError (and a traceback from `mixquant evaluate`).
    bad = _rewrite(exported[0], tmp_path / "d.safetensors", edit_meta=lambda m: m.update({key: DEEP}))
    with pytest.raises(ValueError, match="nested too deeply"):
        load_quantized(bad, TinyResNet())


def test_deeply_nested_header_is_a_value_error(exported, tmp_path):
    raw = exported[0].read_bytes()
    n, header = _header(raw)
    text = json.dumps(header)[:-1] + ', "deep": ' + DEEP[:20_000] + DEEP[-20_000:] + "}"
    bad = tmp_path / "h.safetensors"
    body = text.encode()
    bad.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    with pytest.raises(ValueError, match="nested too deeply"):
        load_quantized(bad, TinyResNet())


def test_cli_evaluate_of_nested_metadata_is_one_line(exported, tmp_path, capsys):
    from mixquant.cli import main

    bad = _rewrite(exported[0], tmp_path / "d.safetensors", edit_meta=lambda m: m.update(config=DEEP))
    torch.save(torch.randn(2, 3, 8, 8), tmp_path / "x.pt")
    assert main(["evaluate", "_quant_models:TinyResNet", str(bad), "--data", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert "nested too deeply" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_fifo_is_refused_not_waited_on(tmp_path):
    # Used to: load_quantized (and `evaluate MODEL FIFO`) blocked forever waiting for a writer.
    fifo = tmp_path / "q.safetensors"
    os.mkfifo(fifo)

    def hung(signum, frame):
        raise AssertionError("load_quantized blocked on a FIFO")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        with pytest.raises(ValueError, match="not a regular file"):
            load_quantized(fifo, TinyResNet())
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_meta_model_is_refused(exported):
    # Used to: "succeed", leaving a model with no data.
    with torch.device("meta"):
        model = TinyResNet()
    with pytest.raises(ValueError, match="meta device"):
        load_quantized(exported[0], model)
    assert not hasattr(model, "mixquant_state")


# -------------------------------------------------------- reproducible ------
def test_export_is_byte_reproducible(tmp_path):
    # Used to: the metadata order changed from call to call, so the same model gave different bytes.
    outs = []
    for i in range(4):
        model = tiny_resnet()
        q = quantize(model, mixquant.uniform(model, 4), progress=False)
        export(q, tmp_path / f"{i}.safetensors")
        outs.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert all(o == outs[0] for o in outs)
    n, header = _header(outs[0])
    assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(header["__metadata__"])
    assert (8 + n) % 8 == 0
