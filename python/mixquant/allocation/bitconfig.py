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
from ..nn.layers import channel_axis, is_quantizable, tied_weights
from .bitconfig_file import FORMAT, METRICS, SENSITIVITY_METRIC, VERSION, parse_bitconfig
# Bytes stored per (scale, zero point) pair besides the packed codes. Per
# channel or per tensor: a float32 scale and an int32 zero point (8 bytes; a
# handful per layer, so exactness costs nothing). Group-wise the pairs are a
# first-order part of the size (at 4 bits and 128 weights per group, 8 bytes
# would add 0.5 bits per weight), so a group's scale is a bfloat16 (2 bytes,
# float32's exponent range: any scale a float32 weight needs is representable;
# rounded up, so the range stays on the grid) and its zero point is packed at
# the layer's bit-width like the codes (GPTQ's layout).
PARAM_BYTES_PER_GROUP = 8
GROUP_SCALE_BYTES = 2
MAX_FILE_BYTES = 64 * 2**20

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["BitConfig", "layer_bytes", "param_groups"]


def layer_bytes(num_params: int, bits: int, groups: int, grouped: bool = False) -> int:
    """Stored size of one layer: packed ``bits``-bit codes plus ``groups`` (scale, zero point) pairs.

    A pair is a float32 scale and an int32 zero point (per channel or per
    tensor), or, when ``grouped``, a bfloat16 scale and a zero point packed at
    ``bits`` bits: exactly what :func:`mixquant.export` writes.
    """
    codes = (num_params * bits + 7) // 8
    if grouped:
        return codes + GROUP_SCALE_BYTES * groups + (groups * bits + 7) // 8
    return codes + PARAM_BYTES_PER_GROUP * groups


def param_groups(shape: Tuple[int, ...], ch_axis: int, per_channel: bool, group_size: Optional[int]) -> int:
    """Number of (scale, zero point) pairs of a weight: 1, C, or C * ceil(K / group_size)."""
    if not per_channel:
        return 1
    c = int(shape[ch_axis])
    if group_size is None:
        return c
    k = math.prod(shape) // c
    return c * -(-k // group_size)


@dataclass
class BitConfig:
    """Per-layer weight bit-widths plus the quantizer settings and the error table behind them.

    Attributes:
        bits: fully-qualified layer name → weight bit-width.
        shapes: layer name → weight shape (checked against a model before use).
        groups: layer name → number of (scale, zero point) pairs: output channels
            when ``per_channel``, times the groups per row with a group size, else 1.
        per_channel, symmetric, clip, p: the quantizer the search measured.
        group_size: the group size of every layer (None: per channel / per tensor),
            unless ``layer_group_size`` names the layer.
        layer_group_size: layer name → its own group size (None: per channel), when
            the budget rule chose the layout per layer.
        tied: layer name → the other modules that share its weight (tied weights:
            one layer, counted once, quantized once).
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
    group_size: Optional[int] = None
    layer_group_size: Dict[str, Optional[int]] = field(default_factory=dict)
    tied: Dict[str, List[str]] = field(default_factory=dict)
    sensitivity: str = "weight"
    calibration: Optional[Dict[str, Any]] = None

    # -- derived figures -------------------------------------------------
    @property
    def spec(self) -> QuantizerSpec:
        """The weight quantizer the errors were measured with, which every method applies.

        With per-layer group sizes (``layer_group_size``) this is the default;
        :meth:`layer_spec` gives each layer's own.
        """
        return QuantizerSpec(self.per_channel, self.symmetric, self.clip, self.p, group_size=self.group_size)

    def group_size_of(self, name: str) -> Optional[int]:
        """The group size of layer ``name`` (None: per channel or per tensor)."""
        return self.layer_group_size[name] if name in self.layer_group_size else self.group_size

    def layer_spec(self, name: str) -> QuantizerSpec:
        """The quantizer of layer ``name``: :attr:`spec` with the layer's group size."""
        gs = self.group_size_of(name)
        return self.spec if gs == self.group_size else self.spec.replace(group_size=gs)

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
        return layer_bytes(self.num_params[name], self.bits[name], self.groups[name],
                           self.group_size_of(name) is not None)

    @property
    def size_bytes(self) -> int:
        """Packed weight codes plus the scales and zero points of all quantized layers (see :func:`layer_bytes`)."""
        return sum(self.layer_size_bytes(name) for name in self.bits)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per quantized weight, scales and zero points included: ``8 * size_bytes / total_params``."""
        total = self.total_params
        return 8.0 * self.size_bytes / total if total else 0.0

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
        self._check_tied(model, modules)
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
            want_groups = param_groups(tuple(module.weight.shape), channel_axis(module), self.per_channel,
                                       self.group_size_of(name))
            if self.groups[name] != want_groups:
                raise ValueError(f"layer {name!r}: config has {self.groups[name]} groups, model needs {want_groups}")

    def _check_tied(self, model: nn.Module, modules: Mapping[str, nn.Module]) -> None:
        """A shared weight must be one layer of the config, and every tie the config records must hold."""
        actual = tied_weights(model, [n for n in self.bits if n in modules])
        for name, others in actual.items():
            twins = [n for n in others if n in self.bits]
            if twins:
                listed = ", ".join(f"{n!r} at {self.bits[n]} bits" for n in [name] + twins)
                raise ValueError(f"this BitConfig does not fit the model: {listed} share one weight (tied "
                                 "weights are one layer: list it once, under one name)")
        for name, others in self.tied.items():
            missing = [n for n in others if n not in actual.get(name, [])]
            if missing:
                raise ValueError(f"this BitConfig does not fit the model: it records layer {name!r} as sharing its "
                                 f"weight with {missing[0]!r}, which in this model has a weight of its own")

    # -- serialisation ---------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "per_channel": self.per_channel,
            "symmetric": self.symmetric,
            "clip": self.clip,
            "p": self.p,
            "group_size": self.group_size,
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
                    **({"group_size": self.layer_group_size[name]} if name in self.layer_group_size else {}),
                    **({"tied": list(self.tied[name])} if name in self.tied else {}),
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
        """A readable per-layer table (name, shape, params, bits, group size when grouped, cost).

        ``metric`` defaults to the data-aware cost for a data-aware search, else ``"norm"``.
        """
        if metric is None:
            metric = "norm" if self.sensitivity == "weight" else SENSITIVITY_METRIC
        grouped = any(self.group_size_of(n) is not None for n in self.bits)
        rows = [("layer", "shape", "params", "bits") + (("group",) if grouped else ()) + (metric,)]
        for name, b in self.bits.items():
            try:
                err = f"{self.error(name, metric):.3e}"
            except KeyError:
                err = "-"
            shape = "x".join(str(s) for s in self.shapes[name])
            gs = self.group_size_of(name)
            label = (name or "<model>") + (f" (= {', '.join(self.tied[name])})" if name in self.tied else "")
            group = (("-" if gs is None else str(gs)),) if grouped else ()
            rows.append((label, shape, str(self.num_params[name]), str(b)) + group + (err,))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]]
        rule = ", ".join(f"{k}={v}" for k, v in self.rule.items())
        gran = "per-channel" if self.per_channel else "per-tensor"
        if self.layer_group_size:
            gran = "group size per layer"
        elif self.group_size is not None:
            gran = f"groups of {self.group_size}"
        lines.append(
            f"{len(self.bits)} layers, {self.total_params} weights, average {self.avg_bits:.3f} bits, "
            f"{self.size_bytes} bytes = {self.bits_per_weight:.3f} bits per weight ({rule}; {gran}, "
            f"{'symmetric' if self.symmetric else 'asymmetric'}, clip={self.clip}; sensitivity={self.sensitivity}"
            + (f" on {self.calibration['samples']} calibration samples" if self.calibration else "") + ")"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

