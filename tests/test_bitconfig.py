"""BitConfig: figures, JSON round trip, fitting a model, and rejecting bad files."""

import json

import pytest
import torch.nn as nn

import mixquant
from conftest import make_small_net


def test_save_load_round_trip(small_net, tmp_path):
    config = mixquant.search(small_net, avg_bits=3.5, keep={"conv1": 8})
    path = tmp_path / "bits.json"
    config.save(path)
    loaded = mixquant.BitConfig.load(path)
    assert loaded == config
    assert loaded.avg_bits == config.avg_bits and loaded.size_bytes == config.size_bytes
    loaded.check_model(make_small_net(seed=3))  # same architecture, other weights: fits


def test_save_refuses_to_clobber(small_net, tmp_path):
    path = tmp_path / "bits.json"
    path.write_text("precious")
    config = mixquant.uniform(small_net, 4)
    with pytest.raises(FileExistsError, match="overwrite"):
        config.save(path)
    assert path.read_text() == "precious"
    config.save(path, overwrite=True)
    assert mixquant.BitConfig.load(path) == config
    assert [p.name for p in tmp_path.iterdir()] == ["bits.json"]  # no temporary file left


def test_str_is_a_table(small_net):
    text = str(mixquant.search(small_net, avg_bits=4))
    assert text.splitlines()[0].split() == ["layer", "shape", "params", "bits", "norm"]
    assert "fc1" in text and "average" in text.splitlines()[-1]


def test_config_for_another_model_is_rejected(small_net):
    config = mixquant.uniform(small_net, 4)
    with pytest.raises(ValueError, match="no layer 'conv1'"):
        config.check_model(nn.Sequential(nn.Linear(3, 4)))
    other = make_small_net()
    other.fc1 = nn.Linear(256, 32)
    with pytest.raises(ValueError, match="layer 'fc1' has weight shape"):
        config.check_model(other)
    other.fc1 = nn.ReLU()
    with pytest.raises(ValueError, match="'fc1' is a ReLU"):
        config.check_model(other)


def _saved(small_net, tmp_path):
    path = tmp_path / "bits.json"
    mixquant.search(small_net, avg_bits=3).save(path)
    return path, json.loads(path.read_text())


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.update(version=99), "unsupported version"),
        (lambda d: d.update(format="other"), "'format'"),
        (lambda d: d["layers"][0].update(bits=0), "bits of layer 'conv1'"),
        (lambda d: d["layers"][0].update(bits="8"), "bits of layer 'conv1'"),
        (lambda d: d["layers"][1].update(shape=[16, -8, 3, 3]), "shape of layer 'conv2'"),
        (lambda d: d["layers"][1].update(groups=10**9), "groups of layer 'conv2'"),
        (lambda d: d["layers"].append(dict(d["layers"][0])), "appears twice"),
        (lambda d: d["layers"][0]["errors"]["sse"].pop(), "must have 7 values"),
        (lambda d: d["layers"][0]["errors"]["mse"].__setitem__(0, -1.0), "non-negative"),
        (lambda d: d.update(size_bytes=d["size_bytes"] - 1), "size_bytes"),
        (lambda d: d.update(layers=[]), "non-empty"),
        (lambda d: d.update(per_channel="yes"), "per_channel"),
        (lambda d: d.__setitem__("rule", {"name": "x", "payload": {"a": 1}}), "plain value"),
    ],
)
def test_tampered_files_are_rejected(small_net, tmp_path, edit, match):
    path, data = _saved(small_net, tmp_path)
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        mixquant.BitConfig.load(path)


@pytest.mark.parametrize("payload", [b"", b"\x00\xff\x13garbage", b"[1, 2, 3]", b'{"format": NaN}', b"{" * 5000])
def test_garbage_files_are_rejected(tmp_path, payload):
    path = tmp_path / "bits.json"
    path.write_bytes(payload)
    with pytest.raises(ValueError):
        mixquant.BitConfig.load(path)


def test_truncated_file_is_rejected(small_net, tmp_path):
    path, _ = _saved(small_net, tmp_path)
    raw = path.read_bytes()
    for cut in (1, len(raw) // 3, len(raw) - 3):
        path.write_bytes(raw[:cut])
        with pytest.raises(ValueError):
            mixquant.BitConfig.load(path)


# ------------------------------------------------ rule against the layers ----
def _fix_summary(d):
    """Recompute the stored summary so that only the edit under test can be refused."""
    c = mixquant.BitConfig(bits={x["name"]: x["bits"] for x in d["layers"]},
                           shapes={x["name"]: tuple(x["shape"]) for x in d["layers"]},
                           groups={x["name"]: x["groups"] for x in d["layers"]})
    d["avg_bits"], d["size_bytes"] = c.avg_bits, c.size_bytes


def _drop_errors(d):
    for layer in d["layers"]:
        layer.pop("errors", None)


def _set_bits(d, i, bits):
    d["layers"][i]["bits"] = bits
    _drop_errors(d)
    _fix_summary(d)


RULE_EDITS = {
    # Each of these used to load (the rule was not checked against the layers).
    "avg_bits -3": ("budget", lambda d: d["rule"].update(avg_bits=-3), "avg_bits must be in"),
    "avg_bits 2**70": ("budget", lambda d: d["rule"].update(avg_bits=2**70), "avg_bits must be in"),
    "avg_bits null": ("budget", lambda d: d["rule"].update(avg_bits=None), "exactly one of"),
    "avg_bits exceeded": ("budget", lambda d: d["rule"].update(avg_bits=3.0), "above the rule's budget"),
    "avg_bits and max_bytes": ("budget", lambda d: d["rule"].update(max_bytes=10**9), "exactly one of"),
    "objective": ("budget", lambda d: d["rule"].update(objective="l1"), "objective"),
    "max_bytes -1": ("bytes", lambda d: d["rule"].update(max_bytes=-1), "max_bytes"),
    "max_bytes exceeded": ("bytes", lambda d: d["rule"].update(max_bytes=d["size_bytes"] - 1), "above the rule's"),
    "qem -5": ("qem", lambda d: d["rule"].update(qem=-5), "qem must be positive"),
    "ref_bits 99": ("qem", lambda d: d["rule"].update(ref_bits=99), "ref_bits"),
    "qem_reference": ("qem", lambda d: d["rule"].update(qem_reference="median"), "qem_reference"),
    "unknown rule": ("qem", lambda d: d["rule"].update(name="magic"), "rule name"),
    "bits 16, candidates [2]": ("budget", lambda d: (d.update(candidates=[2], rule={"name": "uniform", "bits": 2}),
                                                     _set_bits(d, 0, 16)), "not a candidate"),
    "bits off the candidates": ("qem", lambda d: (d.update(candidates=[2, 4, 8]), _set_bits(d, 1, 3)),
                                "not a candidate"),
    "candidates [4, 4]": ("budget", lambda d: d.update(candidates=[4, 4]), "distinct and increasing"),
    "candidates unsorted": ("budget", lambda d: d.update(candidates=[8, 2, 3, 4, 5, 6, 7]), "distinct and increasing"),
    "error table bits [4, 4]": ("budget", lambda d: d["layers"][0]["errors"].update(
        {k: v[:2] for k, v in d["layers"][0]["errors"].items()}, bits=[4, 4]), "distinct and increasing"),
    "error table lacks a candidate": ("budget", lambda d: d["layers"][0]["errors"].update(
        {k: v[1:] for k, v in d["layers"][0]["errors"].items()}), "lack bit-widths"),
    "keep contradicts the layer": ("budget", lambda d: d["rule"].update(keep="conv1=4"), "pins it at 4"),
    "keep names no layer": ("budget", lambda d: d["rule"].update(keep="nope=8"), "does not name a layer"),
    "uniform bits disagree": ("uniform", lambda d: d["rule"].update(bits=5), "uniform rule"),
    "raised not a string": ("budget", lambda d: d["rule"].update(raised=8), "'name=bits"),
}


def _rule_configs(net):
    return {
        "budget": mixquant.search(net, avg_bits=4, keep={"conv1": 8}),
        "bytes": mixquant.search(net, max_bytes=9000),
        "qem": mixquant.search(net, qem=4),
        "uniform": mixquant.uniform(net, 4, keep={"fc2": 8}),
    }


@pytest.mark.parametrize("edit", list(RULE_EDITS))
def test_rule_that_contradicts_the_layers_is_refused(small_net, tmp_path, edit):
    kind, fn, match = RULE_EDITS[edit]
    data = _rule_configs(small_net)[kind].to_dict()
    fn(data)
    path = tmp_path / "bits.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        mixquant.BitConfig.load(path)


def test_every_rule_the_library_writes_loads(small_net, tmp_path):
    configs = _rule_configs(small_net)
    configs["qem model"] = mixquant.search(small_net, qem=2, qem_reference="model", ref_bits=6)
    configs["uniform no errors"] = mixquant.uniform(small_net, 3, errors=False)
    for label, config in configs.items():
        path = tmp_path / f"{label}.json"
        config.save(path)
        assert mixquant.BitConfig.load(path) == config, label


def test_applied_config_records_what_quantize_changed(small_net):
    # A granularity change is recorded (the bits are applied as configured), so the applied config
    # (embedded in exports) still satisfies the rule checks.
    config = mixquant.search(small_net, bits=[2, 3, 4], avg_bits=3)
    q = mixquant.quantize(small_net, config, per_channel=False, progress=False)
    applied = q.mixquant_state.config
    assert applied.bits == config.bits and "raised" not in applied.rule
    assert applied.rule["quantizer_changed"] is True and applied.errors == {}
    assert mixquant.BitConfig.from_dict(applied.to_dict()) == applied
    # Files of earlier versions may record layers a method raised; what they say is still checked.
    data = applied.to_dict()
    data["rule"]["raised"] = "conv1=8"
    for layer in data["layers"]:
        if layer["name"] == "conv1":
            layer["bits"] = 8
    _fix_summary(data)
    mixquant.BitConfig.from_dict(data)
    data["rule"]["raised"] = "conv1=7"
    with pytest.raises(ValueError, match="pins it at 7"):
        mixquant.BitConfig.from_dict(data)


def test_per_tensor_config_with_groups_is_refused(small_net, tmp_path):
    # Kills the mutation that drops the per-tensor "groups == 1" check (no test held it).
    data = mixquant.search(small_net, avg_bits=4, per_channel=False).to_dict()
    data["layers"][1]["groups"] = 16
    _fix_summary(data)
    path = tmp_path / "bits.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="16 groups in a per-tensor config"):
        mixquant.BitConfig.load(path)

def test_version_1_files_still_load_and_version_2_is_strict(small_net):
    cfg = mixquant.search(small_net, avg_bits=4)
    data = cfg.to_dict()
    assert data["version"] == 2 and data["group_size"] is None
    v1 = {k: v for k, v in data.items() if k != "group_size"}
    v1["version"] = 1
    assert mixquant.BitConfig.from_dict(v1) == cfg
    for bad, match in [
        ({**v1, "group_size": 32}, "needs version 2"),
        ({k: v for k, v in data.items() if k != "group_size"}, "'group_size' is missing"),
        ({**data, "group_size": 0}, "group_size must be an int"),
        ({**data, "group_size": True}, "group_size must be an int"),
        ({**data, "group_size": 16, "per_channel": False}, "per-tensor"),
        ({**data, "group_size": 16}, "groups of 16 do not fit"),  # groups still per channel
        ({**data, "version": 3}, "unsupported version"),
    ]:
        with pytest.raises(ValueError, match=match):
            mixquant.BitConfig.from_dict(bad)
    grouped = mixquant.search(small_net, avg_bits=4, group_size=16).to_dict()
    assert mixquant.BitConfig.from_dict(grouped).group_size == 16
    grouped["layers"][0]["groups"] += 1
    with pytest.raises(ValueError, match="do not fit"):
        mixquant.BitConfig.from_dict(grouped)
    layered = mixquant.search(small_net, bits_per_weight=5, group_size=[None, 16]).to_dict()
    layered["layers"][1]["group_size"] = "16"
    with pytest.raises(ValueError, match="group_size of layer"):
        mixquant.BitConfig.from_dict(layered)
