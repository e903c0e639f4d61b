"""The bit-config file format, and its strict parser: every field is checked before use.

Version 2 adds the group-wise layout: a top-level ``group_size`` (null or an
int), a layer's own ``group_size`` when the budget rule chose the layout per
layer, and a layer's ``tied`` list (the other modules sharing its weight).
Version-1 files (per channel or per tensor, no ties) are still read.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from ..core.limits import CLIP_METHODS, MAX_BITS, MIN_BITS

FORMAT = "mixquant.bitconfig"
VERSION = 2
READABLE_VERSIONS = (1, 2)
METRICS = ("sse", "mse", "norm", "max_abs")
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
            errors[name] = _parse_errors(layer["errors"], name)
    for key in ("avg_bits", "size_bytes"):
        if key in data:
            _number(data[key], key)
    aliases = [n for others in tied.values() for n in others]
    clash = next((n for n in aliases if n in bits or aliases.count(n) > 1), None)
    if clash is not None:
        _fail(f"{clash!r} is recorded as sharing the weight of a layer and is listed again")
    config = cls(bits=bits, shapes=shapes, groups=groups, per_channel=per_channel, symmetric=symmetric,
                 clip=clip, p=p, candidates=candidates, rule=dict(rule), errors=errors, group_size=group_size,
                 layer_group_size=layer_gs, tied=tied)
    # The stored summary must agree with the layers; a mismatch means the file was edited.
    if "size_bytes" in data and data["size_bytes"] != config.size_bytes:
        _fail(f"size_bytes {data['size_bytes']} does not match the layers ({config.size_bytes})")
    if "avg_bits" in data and abs(data["avg_bits"] - config.avg_bits) > 1e-9 * max(1.0, config.avg_bits):
        _fail(f"avg_bits {data['avg_bits']} does not match the layers ({config.avg_bits})")
    return config


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


def _parse_errors(table: Any, name: str) -> dict:
    if not isinstance(table, dict) or set(table) != {"bits", *METRICS}:
        _fail(f"errors of layer {name!r} must hold 'bits' and {METRICS}")
    table_bits = table["bits"]
    if not isinstance(table_bits, list) or not table_bits or len(table_bits) > MAX_BITS:
        _fail(f"errors of layer {name!r}: 'bits' must be a non-empty list")
    out = {"bits": [_int(b, f"error table bits of {name!r}", MIN_BITS, MAX_BITS) for b in table_bits]}
    for metric in METRICS:
        values = table[metric]
        if not isinstance(values, list) or len(values) != len(table_bits):
            _fail(f"errors of layer {name!r}: {metric!r} must have {len(table_bits)} values")
        out[metric] = [_number(v, f"{metric} of layer {name!r}") for v in values]
        if any(v < 0 for v in out[metric]):
            _fail(f"errors of layer {name!r}: {metric!r} must be non-negative")
    return out
