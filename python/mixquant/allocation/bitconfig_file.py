"""The bit-config file format, and its strict parser: every field is checked before use."""

from __future__ import annotations

import math
from typing import Any, Mapping

from ..core.limits import CLIP_METHODS, MAX_BITS, MIN_BITS

FORMAT = "mixquant.bitconfig"
#: Version 2 adds the sensitivity the bits were chosen with and the calibration data's provenance;
#: version-1 files (data-free searches) are still read.
VERSION = 2
READABLE_VERSIONS = (1, 2)
METRICS = ("sse", "mse", "norm", "max_abs")
#: The data-aware cost of each candidate, recorded beside the weight metrics.
SENSITIVITY_METRIC = "sensitivity"
SENSITIVITY_NAMES = ("weight", "input", "output", "fisher", "model")
_HEX = set("0123456789abcdef")
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
    candidates = data.get("candidates")
    if not isinstance(candidates, list) or not candidates or len(candidates) > MAX_BITS:
        _fail("candidates must be a non-empty list of bit-widths")
    candidates = [_int(b, "candidate bit-width", MIN_BITS, MAX_BITS) for b in candidates]
    rule = data.get("rule")
    if not isinstance(rule, dict) or not isinstance(rule.get("name"), str):
        _fail("rule must be an object with a 'name'")
    for key, value in rule.items():
        if not isinstance(key, str) or not (value is None or isinstance(value, (str, int, float, bool))):
            _fail(f"rule entry {key!r} must be a plain value")
    layers = data.get("layers")
    if not isinstance(layers, list) or not layers or len(layers) > MAX_LAYERS:
        _fail("layers must be a non-empty list")
    bits, shapes, groups, errors = {}, {}, {}, {}
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
        groups[name] = _int(layer.get("groups"), f"groups of layer {name!r}", 1, max(shapes[name]))
        if not per_channel and groups[name] != 1:
            _fail(f"layer {name!r} has {groups[name]} groups in a per-tensor config")
        if "errors" in layer:
            errors[name] = _parse_errors(layer["errors"], name, sensitivity != "weight")
    for key in ("avg_bits", "size_bytes"):
        if key in data:
            _number(data[key], key)
    config = cls(bits=bits, shapes=shapes, groups=groups, per_channel=per_channel, symmetric=symmetric,
                 clip=clip, p=p, candidates=candidates, rule=dict(rule), errors=errors, sensitivity=sensitivity,
                 calibration=calibration)
    # The stored summary must agree with the layers; a mismatch means the file was edited.
    if "size_bytes" in data and data["size_bytes"] != config.size_bytes:
        _fail(f"size_bytes {data['size_bytes']} does not match the layers ({config.size_bytes})")
    if "avg_bits" in data and abs(data["avg_bits"] - config.avg_bits) > 1e-9 * max(1.0, config.avg_bits):
        _fail(f"avg_bits {data['avg_bits']} does not match the layers ({config.avg_bits})")
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


def _parse_errors(table: Any, name: str, data_aware: bool) -> dict:
    keys = {"bits", *METRICS} | ({SENSITIVITY_METRIC} if data_aware else set())
    if not isinstance(table, dict) or set(table) != keys:
        _fail(f"errors of layer {name!r} must hold exactly {sorted(keys)}")
    table_bits = table["bits"]
    if not isinstance(table_bits, list) or not table_bits or len(table_bits) > MAX_BITS:
        _fail(f"errors of layer {name!r}: 'bits' must be a non-empty list")
    out = {"bits": [_int(b, f"error table bits of {name!r}", MIN_BITS, MAX_BITS) for b in table_bits]}
    for metric in METRICS + ((SENSITIVITY_METRIC,) if data_aware else ()):
        values = table[metric]
        if not isinstance(values, list) or len(values) != len(table_bits):
            _fail(f"errors of layer {name!r}: {metric!r} must have {len(table_bits)} values")
        out[metric] = [_number(v, f"{metric} of layer {name!r}") for v in values]
        if any(v < 0 for v in out[metric]):
            _fail(f"errors of layer {name!r}: {metric!r} must be non-negative")
    return out
