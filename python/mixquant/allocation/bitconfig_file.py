"""The bit-config file format, and its strict parser: every field is checked before use.

Version 2 adds the group-wise layout: a top-level ``group_size`` (null or an
int), a layer's own ``group_size`` when the budget rule chose the layout per
layer, and a layer's ``tied`` list (the other modules sharing its weight).
Version-1 files (per channel or per tensor, no ties) are still read.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from ..core.limits import CLIP_METHODS, MAX_BITS, MIN_BITS

FORMAT = "mixquant.bitconfig"
#: Version 2 adds the sensitivity the bits were chosen with, the calibration data's provenance,
#: group sizes and tied weights; version-1 files (data-free, per-channel/per-tensor) are still read.
VERSION = 2
READABLE_VERSIONS = (1, 2)
METRICS = ("sse", "mse", "norm", "max_abs")
#: The data-aware cost of each candidate, recorded beside the weight metrics.
SENSITIVITY_METRIC = "sensitivity"
SENSITIVITY_NAMES = ("weight", "input", "output", "fisher", "model")
_HEX = set("0123456789abcdef")
#: The rules that choose bits (see :mod:`.rules`), and their options.
RULES = ("uniform", "qem", "budget")
OBJECTIVES = ("mse", "norm", "sse")
QEM_REFERENCES = ("layer", "model")
MAX_LAYERS = 100_000
MAX_DIMS = 8
MAX_NUMEL = 2**48


def _fail(msg: str) -> None:
    raise ValueError(f"invalid bit config: {msg}")


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        _fail(f"{what} must be an int in {lo}..{hi}, got {value!r}")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        _fail(f"{what} must be true or false, got {value!r}")
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(f"{what} must be a finite number, got {value!r}")
    try:
        number = float(value)  # an int beyond the float range raises OverflowError
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        _fail(f"{what} must be a finite number, got {str(value)[:40]}")
    return number


def parse_bitconfig(cls: type, data: Mapping[str, Any]) -> Any:
    """Validate ``data`` (as written by ``BitConfig.to_dict``) and build ``cls`` (``BitConfig``) from it."""
    if not isinstance(data, Mapping):
        _fail(f"top level must be a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        _fail(f"'format' must be {FORMAT!r}, got {data.get('format')!r}")
    version = data.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        _fail(f"unsupported version {version!r} (this mixquant reads versions {READABLE_VERSIONS})")
    sensitivity, calibration = "weight", None
    if version >= 2:
        sensitivity = data.get("sensitivity")
        if sensitivity not in SENSITIVITY_NAMES:
            _fail(f"sensitivity must be one of {SENSITIVITY_NAMES}, got {sensitivity!r}")
        calibration = _parse_calibration(data.get("calibration"), sensitivity)
    per_channel = _bool(data.get("per_channel"), "per_channel")
    symmetric = _bool(data.get("symmetric"), "symmetric")
    clip = data.get("clip")
    if clip not in CLIP_METHODS:
        _fail(f"clip must be one of {CLIP_METHODS}, got {clip!r}")
    p = _number(data.get("p"), "p")
    if p <= 0:
        _fail(f"p must be positive, got {p}")
    if version == 1:
        if "group_size" in data:
            _fail("'group_size' needs version 2")
        group_size = None
    else:
        if "group_size" not in data:
            _fail("'group_size' is missing (null for per-channel or per-tensor)")
        group_size = _group_size(data["group_size"], "group_size", per_channel)
    candidates = data.get("candidates")
    if not isinstance(candidates, list) or not candidates or len(candidates) > MAX_BITS:
        _fail("candidates must be a non-empty list of bit-widths")
    candidates = [_int(b, "candidate bit-width", MIN_BITS, MAX_BITS) for b in candidates]
    if any(a >= b for a, b in zip(candidates, candidates[1:])):
        _fail(f"candidates must be distinct and increasing, got {candidates}")
    rule = data.get("rule")
    if not isinstance(rule, dict) or not isinstance(rule.get("name"), str):
        _fail("rule must be an object with a 'name'")
    for key, value in rule.items():
        if not isinstance(key, str) or not (value is None or isinstance(value, (str, int, float, bool))):
            _fail(f"rule entry {key!r} must be a plain value")
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers or len(layers) > MAX_LAYERS:
        _fail("layers must be a non-empty list")
    bits, shapes, groups, errors, layer_gs, tied = {}, {}, {}, {}, {}, {}
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            _fail(f"layer #{i} must be an object")
        name = layer.get("name")
        if not isinstance(name, str) or len(name) > 1000:
            _fail(f"layer #{i} needs a string 'name'")
        if name in bits:
            _fail(f"layer {name!r} appears twice")
        bits[name] = _int(layer.get("bits"), f"bits of layer {name!r}", MIN_BITS, MAX_BITS)
        shape = layer.get("shape")
        if not isinstance(shape, list) or not 2 <= len(shape) <= MAX_DIMS:
            _fail(f"shape of layer {name!r} must be a list of 2..{MAX_DIMS} ints")
        shapes[name] = tuple(_int(s, f"shape of layer {name!r}", 1, MAX_NUMEL) for s in shape)
        if math.prod(shapes[name]) > MAX_NUMEL:
            _fail(f"layer {name!r} is impossibly large")
        if version == 1 and ("group_size" in layer or "tied" in layer):
            _fail(f"layer {name!r}: 'group_size' and 'tied' need version 2")
        if "group_size" in layer:
            layer_gs[name] = _group_size(layer["group_size"], f"group_size of layer {name!r}", per_channel)
        gs = layer_gs.get(name, group_size)
        groups[name] = _int(layer.get("groups"), f"groups of layer {name!r}", 1,
                            max(shapes[name]) if gs is None else math.prod(shapes[name]))
        if not per_channel and groups[name] != 1:
            _fail(f"layer {name!r} has {groups[name]} groups in a per-tensor config")
        if gs is not None and not _fits_groups(shapes[name], gs, groups[name]):
            _fail(f"layer {name!r}: {groups[name]} groups of {gs} do not fit shape {list(shapes[name])}")
        if "tied" in layer:
            tied[name] = _tied(layer["tied"], name)
        if "errors" in layer:
            errors[name] = _parse_errors(layer["errors"], name, sensitivity != "weight")
    for key in ("avg_bits", "size_bytes"):
        if key in data:
            _number(data[key], key)
    aliases = [n for others in tied.values() for n in others]
    clash = next((n for n in aliases if n in bits or aliases.count(n) > 1), None)
    if clash is not None:
        _fail(f"{clash!r} is recorded as sharing the weight of a layer and is listed again")
    config = cls(bits=bits, shapes=shapes, groups=groups, per_channel=per_channel, symmetric=symmetric,
                 clip=clip, p=p, candidates=candidates, rule=dict(rule), errors=errors, group_size=group_size,
                 layer_group_size=layer_gs, tied=tied, sensitivity=sensitivity, calibration=calibration)
    # The stored summary must agree with the layers; a mismatch means the file was edited.
    if "size_bytes" in data and data["size_bytes"] != config.size_bytes:
        _fail(f"size_bytes {data['size_bytes']} does not match the layers ({config.size_bytes})")
    if "avg_bits" in data and abs(data["avg_bits"] - config.avg_bits) > 1e-9 * max(1.0, config.avg_bits):
        _fail(f"avg_bits {data['avg_bits']} does not match the layers ({config.avg_bits})")
    _check_rule(config)
    return config


def _parse_calibration(value: Any, sensitivity: str) -> Any:
    if sensitivity == "weight":
        if value is not None:
            _fail("a data-free (sensitivity 'weight') config records no calibration data")
        return None
    if not isinstance(value, dict) or not {"samples", "sha256"} <= set(value) <= {"samples", "sha256", "seconds"}:
        _fail(f"calibration of a {sensitivity!r} config must be an object with 'samples' and 'sha256'")
    out = {"samples": _int(value["samples"], "calibration samples", 1, 2**62)}
    digest = value["sha256"]
    if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
        _fail("calibration sha256 must be 64 lowercase hex digits")
    out["sha256"] = digest
    if "seconds" in value:
        out["seconds"] = _number(value["seconds"], "calibration seconds")
        if out["seconds"] < 0:
            _fail("calibration seconds must be non-negative")
    return out


def _pinned(rule: Mapping[str, Any], key: str, bits: Mapping[str, int]) -> dict:
    """``rule[key]``, a ``"name=bits,..."`` list of pinned layers, each checked against the layers."""
    text = rule.get(key)
    if text is None:
        return {}
    if not isinstance(text, str):
        _fail(f"rule {key!r} must be a 'name=bits,...' string, got {text!r}")
    out = {}
    for item in text.split(",") if text else []:
        name, sep, value = item.rpartition("=")
        if not sep or name not in bits or name in out:
            _fail(f"rule {key!r}: {item!r} does not name a layer of the config once")
        if not value.isdigit():
            _fail(f"rule {key!r}: {item!r} has no integer bit-width")
        out[name] = int(value)
    return out


def _check_rule(config: Any) -> None:
    """The recorded rule, the candidates and the error tables must agree with the layers' bits.

    ``rule["keep"]`` lists the layers the caller pinned; ``rule["raised"]`` the
    layers a method raised afterwards (first/last layer at 8 bits);
    ``rule["quantizer_changed"]`` marks a config applied with another
    granularity or symmetry than the one searched. Every other layer sits on a
    candidate, and a budget the layers exceed is a contradiction.
    """
    rule, bits, candidates = config.rule, config.bits, config.candidates
    name = rule["name"]
    if name not in RULES:
        _fail(f"rule name must be one of {RULES}, got {name!r}")
    raised = _pinned(rule, "raised", bits)
    keep = {k: v for k, v in _pinned(rule, "keep", bits).items() if k not in raised}
    changed = rule.get("quantizer_changed", False)
    if changed is not True and "quantizer_changed" in rule:
        _fail(f"rule 'quantizer_changed' must be true when present, got {changed!r}")
    for layer, b in {**keep, **raised}.items():
        if bits[layer] != b:
            _fail(f"layer {layer!r} has {bits[layer]} bits, the rule pins it at {b}")
    for layer, b in bits.items():
        if layer not in keep and layer not in raised and b not in candidates:
            _fail(f"layer {layer!r} has {b} bits, which is not a candidate {candidates}")
    if name == "uniform":
        if _int(rule.get("bits"), "rule bits", MIN_BITS, MAX_BITS) != candidates[0] or len(candidates) != 1:
            _fail(f"a uniform rule at {rule.get('bits')} bits must have exactly that candidate, got {candidates}")
    elif name == "qem":
        if not _number(rule.get("qem"), "rule qem") > 0:
            _fail(f"rule qem must be positive, got {rule.get('qem')}")
        _int(rule.get("ref_bits"), "rule ref_bits", MIN_BITS, MAX_BITS)
        if rule.get("qem_reference") not in QEM_REFERENCES:
            _fail(f"rule qem_reference must be one of {QEM_REFERENCES}, got {rule.get('qem_reference')!r}")
    else:
        _check_budget(config, rule, raised, changed)
    for layer, table in config.errors.items():
        needed = set() if layer in raised else {bits[layer]}
        if name != "uniform":
            needed |= set(candidates) | ({rule["ref_bits"]} if name == "qem" else set())
        if not needed <= set(table["bits"]):
            _fail(f"errors of layer {layer!r} lack bit-widths {sorted(needed - set(table['bits']))}")


def _check_budget(config: Any, rule: Mapping[str, Any], raised: Mapping[str, int], changed: bool) -> None:
    if config.sensitivity == "weight":
        if rule.get("objective") not in OBJECTIVES:
            _fail(f"rule objective must be one of {OBJECTIVES}, got {rule.get('objective')!r}")
    elif "objective" in rule:  # data-aware costs are summed as they are
        _fail(f"a {config.sensitivity!r} budget rule has no objective, got {rule['objective']!r}")
    given = [k for k in ("avg_bits", "max_bytes", "bits_per_weight") if rule.get(k) is not None]
    if len(given) != 1:
        _fail(f"a budget rule needs exactly one of avg_bits, max_bytes, bits_per_weight, got {given or 'none'}")
    # A raised layer may have been anything before it was raised: count it at the fewest bits.
    lowest = dataclasses.replace(config, bits={**config.bits, **{layer: MIN_BITS for layer in raised}})
    total = config.total_params  # the budget rule's own capacities: weight-bits, or bytes
    if "avg_bits" in given:
        budget = _number(rule["avg_bits"], "rule avg_bits")
        if not 0 < budget <= MAX_BITS:
            _fail(f"rule avg_bits must be in (0, {MAX_BITS}], got {budget}")
        if sum(config.num_params[k] * b for k, b in lowest.bits.items()) > math.floor(budget * total + 1e-9 * total):
            _fail(f"the layers average {config.avg_bits:.6g} bits, above the rule's budget avg_bits={budget}")
    elif "bits_per_weight" in given:
        budget = _number(rule["bits_per_weight"], "rule bits_per_weight")
        if not 0 < budget <= 2 * MAX_BITS + 64:
            _fail(f"rule bits_per_weight must be positive and below any stored size, got {budget}")
        if not changed and lowest.size_bytes > math.floor(budget * total / 8 + 1e-9 * total):
            _fail(f"the layers take {config.bits_per_weight:.6g} bits per weight, above the rule's budget "
                  f"bits_per_weight={budget}")
    else:
        budget = _int(rule["max_bytes"], "rule max_bytes", 1, 2**63 - 1)
        if not changed and lowest.size_bytes > budget:  # another granularity changes the scale count
            _fail(f"the layers take {config.size_bytes} bytes, above the rule's budget max_bytes={budget}")


def _group_size(value: Any, what: str, per_channel: bool) -> Any:
    if value is None:
        return None
    size = _int(value, what, 1, MAX_NUMEL)
    if not per_channel:
        _fail(f"{what} {size} in a per-tensor config (groups split output channels)")
    return size


def _fits_groups(shape: tuple, group_size: int, groups: int) -> bool:
    """Whether some axis of ``shape`` as the output channels gives ``groups`` groups of ``group_size``."""
    numel = math.prod(shape)
    return any(c * -(-(numel // c) // group_size) == groups for c in shape)


def _tied(value: Any, name: str) -> list:
    if not isinstance(value, list) or not value or len(value) > MAX_LAYERS:
        _fail(f"tied of layer {name!r} must be a non-empty list of module names")
    if not all(isinstance(n, str) and len(n) <= 1000 for n in value) or len(set(value)) != len(value):
        _fail(f"tied of layer {name!r} must list distinct module names")
    if name in value:
        _fail(f"layer {name!r} is listed as tied to itself")
    return list(value)


def _parse_errors(table: Any, name: str, data_aware: bool) -> dict:
    keys = {"bits", *METRICS} | ({SENSITIVITY_METRIC} if data_aware else set())
    if not isinstance(table, dict) or set(table) != keys:
        _fail(f"errors of layer {name!r} must hold exactly {sorted(keys)}")
    table_bits = table["bits"]
    if not isinstance(table_bits, list) or not table_bits or len(table_bits) > MAX_BITS:
        _fail(f"errors of layer {name!r}: 'bits' must be a non-empty list")
    out = {"bits": [_int(b, f"error table bits of {name!r}", MIN_BITS, MAX_BITS) for b in table_bits]}
    if any(a >= b for a, b in zip(out["bits"], out["bits"][1:])):
        _fail(f"errors of layer {name!r}: 'bits' must be distinct and increasing, got {out['bits']}")
    for metric in METRICS + ((SENSITIVITY_METRIC,) if data_aware else ()):
        values = table[metric]
        if not isinstance(values, list) or len(values) != len(table_bits):
            _fail(f"errors of layer {name!r}: {metric!r} must have {len(table_bits)} values")
        out[metric] = [_number(v, f"{metric} of layer {name!r}") for v in values]
        if any(v < 0 for v in out[metric]):
            _fail(f"errors of layer {name!r}: {metric!r} must be non-negative")
    return out
