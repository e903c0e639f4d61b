"""``BitConfig``: the per-layer weight bit-widths a search picked, and how they were picked."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch.nn as nn

from ..core.spec import QuantizerSpec
from ..io import strict_json
from ..io.files import read_regular, write_text_atomic
from ..nn.layers import channel_axis, is_quantizable
from .bitconfig_file import FORMAT, METRICS, SENSITIVITY_METRIC, VERSION, parse_bitconfig
# Bytes stored per quantization group besides the packed codes: a float32 scale
# and an int32 zero point.
PARAM_BYTES_PER_GROUP = 8
MAX_FILE_BYTES = 64 * 2**20

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["BitConfig", "layer_bytes"]


def layer_bytes(num_params: int, bits: int, groups: int) -> int:
    """Stored size of one layer: packed ``bits``-bit codes plus a scale and zero point per group."""
    return (num_params * bits + 7) // 8 + PARAM_BYTES_PER_GROUP * groups


@dataclass
class BitConfig:
    """Per-layer weight bit-widths plus the quantizer settings and the error table behind them.

    Attributes:
        bits: fully-qualified layer name → weight bit-width.
        shapes: layer name → weight shape (checked against a model before use).
        groups: layer name → number of (scale, zero point) pairs: output channels
            when ``per_channel``, else 1.
        per_channel, symmetric, clip, p: the quantizer the search measured.
        candidates: the candidate bit-widths.
        rule: how the bits were chosen (``{"name": "uniform"|"qem"|"budget", ...}``).
        errors: layer name → ``{"bits": [...], "sse": [...], "mse": [...], "norm": [...],
            "max_abs": [...]}`` (may be empty), plus ``"sensitivity": [...]`` (the
            data-aware cost of each candidate) for a data-aware search.
        sensitivity: what the bits were chosen from: ``"weight"`` (the data-free
            roundoff-error table) or a data-aware sensitivity.
        calibration: for a data-aware search, ``{"samples": N, "sha256": ...,
            "seconds": ...}``: how many calibration samples were used, a hash of
            them (inputs, labels, names, dtypes, shapes) and the measuring time.
    """

    bits: Dict[str, int]
    shapes: Dict[str, Tuple[int, ...]]
    groups: Dict[str, int]
    per_channel: bool = True
    symmetric: bool = False
    clip: str = "minmax"
    p: float = 2.0
    candidates: List[int] = field(default_factory=lambda: list(range(2, 9)))
    rule: Dict[str, Any] = field(default_factory=lambda: {"name": "uniform"})
    errors: Dict[str, Dict[str, List[float]]] = field(default_factory=dict)
    sensitivity: str = "weight"
    calibration: Optional[Dict[str, Any]] = None

    # -- derived figures -------------------------------------------------
    @property
    def spec(self) -> QuantizerSpec:
        """The weight quantizer the errors were measured with, which every method applies."""
        return QuantizerSpec(self.per_channel, self.symmetric, self.clip, self.p)

    @property
    def layer_names(self) -> List[str]:
        return list(self.bits)

    @property
    def num_params(self) -> Dict[str, int]:
        return {name: math.prod(shape) for name, shape in self.shapes.items()}

    @property
    def total_params(self) -> int:
        return sum(self.num_params.values())

    @property
    def avg_bits(self) -> float:
        """Parameter-weighted average bit-width over the quantized layers."""
        n = self.num_params
        total = sum(n.values())
        return sum(n[k] * b for k, b in self.bits.items()) / total if total else 0.0

    def layer_size_bytes(self, name: str) -> int:
        return layer_bytes(self.num_params[name], self.bits[name], self.groups[name])

    @property
    def size_bytes(self) -> int:
        """Packed weight codes plus float32 scales and int32 zero points of all quantized layers."""
        return sum(self.layer_size_bytes(name) for name in self.bits)

    def error(self, name: str, metric: str = "mse", bits: Optional[int] = None) -> float:
        """A layer's roundoff error (``metric`` in sse/mse/norm/max_abs, or ``"sensitivity"``) at its bits or ``bits``."""
        if metric == SENSITIVITY_METRIC and self.sensitivity == "weight":
            raise KeyError("this config was searched without data: it records no 'sensitivity' costs")
        if metric not in METRICS + (SENSITIVITY_METRIC,):
            raise ValueError(f"metric must be one of {METRICS + (SENSITIVITY_METRIC,)}, got {metric!r}")
        table = self.errors.get(name)
        b = self.bits[name] if bits is None else bits
        if not table or b not in table["bits"]:
            raise KeyError(f"no error recorded for layer {name!r} at {b} bits")
        return float(table[metric][table["bits"].index(b)])

    def total_error(self, metric: str = "mse") -> float:
        """Sum over layers of the chosen bits' error (``metric`` as in :meth:`error`)."""
        return sum(self.error(name, metric) for name in self.bits)

    # -- checks against a model ------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError unless every configured layer exists in ``model`` with the same weight shape."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        modules = dict(model.named_modules())
        for name, shape in self.shapes.items():
            module = modules.get(name)
            if module is None:
                raise ValueError(f"this BitConfig does not fit the model: it has no layer {name!r}")
            if not is_quantizable(module):
                raise ValueError(
                    f"this BitConfig does not fit the model: layer {name!r} is a "
                    f"{type(module).__name__}, not a quantizable layer"
                )
            if tuple(module.weight.shape) != tuple(shape):
                raise ValueError(
                    f"this BitConfig does not fit the model: layer {name!r} has weight shape "
                    f"{tuple(module.weight.shape)}, the config expects {tuple(shape)}"
                )
            want_groups = module.weight.shape[channel_axis(module)] if self.per_channel else 1
            if self.groups[name] != want_groups:
                raise ValueError(f"layer {name!r}: config has {self.groups[name]} groups, model needs {want_groups}")

    # -- serialisation ---------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "per_channel": self.per_channel,
            "symmetric": self.symmetric,
            "clip": self.clip,
            "p": self.p,
            "candidates": list(self.candidates),
            "rule": dict(self.rule),
            "sensitivity": self.sensitivity,
            "calibration": None if self.calibration is None else dict(self.calibration),
            "avg_bits": self.avg_bits,
            "size_bytes": self.size_bytes,
            "layers": [
                {
                    "name": name,
                    "bits": self.bits[name],
                    "shape": list(self.shapes[name]),
                    "groups": self.groups[name],
                    **({"errors": self.errors[name]} if name in self.errors else {}),
                }
                for name in self.bits
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BitConfig":
        """Build a config from :meth:`to_dict` output, validating every field."""
        return parse_bitconfig(cls, data)

    def save(self, path: PathLike, *, overwrite: bool = False) -> None:
        """Write the config as versioned JSON, atomically; an existing file is kept unless ``overwrite``."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n", overwrite)

    @classmethod
    def load(cls, path: PathLike) -> "BitConfig":
        """Read a config written by :meth:`save`; ValueError for a malformed or tampered file.

        Only a regular file of at most 64 MiB is read; the JSON must be strict (no NaN/Infinity,
        no duplicate keys, bounded nesting) before every field is validated.
        """
        shown = repr(os.fspath(path))
        raw = read_regular(path, MAX_FILE_BYTES, "bit config")
        try:
            data = strict_json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"{shown} is not a mixquant bit config ({exc})") from None
        return cls.from_dict(data)

    # -- display ---------------------------------------------------------
    def table(self, metric: Optional[str] = None) -> str:
        """A readable per-layer table (name, shape, params, bits, cost).

        ``metric`` defaults to the data-aware cost for a data-aware search, else ``"norm"``.
        """
        if metric is None:
            metric = "norm" if self.sensitivity == "weight" else SENSITIVITY_METRIC
        rows = [("layer", "shape", "params", "bits", metric)]
        for name, b in self.bits.items():
            try:
                err = f"{self.error(name, metric):.3e}"
            except KeyError:
                err = "-"
            shape = "x".join(str(s) for s in self.shapes[name])
            rows.append((name or "<model>", shape, str(self.num_params[name]), str(b), err))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]]
        rule = ", ".join(f"{k}={v}" for k, v in self.rule.items())
        lines.append(
            f"{len(self.bits)} layers, {self.total_params} weights, average {self.avg_bits:.3f} bits, "
            f"{self.size_bytes} bytes ({rule}; {'per-channel' if self.per_channel else 'per-tensor'}, "
            f"{'symmetric' if self.symmetric else 'asymmetric'}, clip={self.clip}; sensitivity={self.sensitivity}"
            + (f" on {self.calibration['samples']} calibration samples" if self.calibration else "") + ")"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

