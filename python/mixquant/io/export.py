"""Save a quantized model with real integer weights, and load it back bit-exactly.

File format (safetensors, ``format = "mixquant.quantized"``, version 1):

* for each quantized layer ``L``: ``L.weight.packed`` (uint8, the codes
  flattened in the weight's memory order and packed LSB-first at the layer's
  bit-width by :func:`mixquant.pack_bits`), ``L.weight_scale`` (float32,
  ``[C]`` or ``[1]``) and ``L.weight_zero_point`` (int32, same shape);
* every other entry of the model's ``state_dict`` as it is: biases, batch norms
  that were not folded, unquantized layers, activation quantizer scales and
  zero points;
* metadata (JSON strings): the applied :class:`BitConfig`, each layer's bits,
  shape and channel axis, the activation quantizers, the folded batch norms,
  the method.

Size accounting: packed codes plus scales and zero points are exactly
:attr:`BitConfig.size_bytes` of the applied config; the file is larger by the
other float tensors and the safetensors header (JSON), which for small models
can be more than 1 % of the total. :class:`ExportInfo` reports each part.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Dict, Union

import torch
import torch.nn as nn

from ..allocation.bitconfig import BitConfig
from ..api.quantize import QuantState, _state, quantized_keys
from ..core.kernels import pack_bits, quantize_tensor, unpack_bits
from ..core.limits import MAX_ACT_BITS, MAX_BITS, MIN_ACT_BITS, MIN_BITS
from ..nn import qmodules
from ..nn.fold import apply_fold_structure
from ..nn.layers import is_scripted, submodule
from .files import write_bytes_atomic

__all__ = ["export", "load_quantized", "ExportInfo", "FORMAT", "VERSION"]

FORMAT = "mixquant.quantized"
VERSION = 1
PACKED_SUFFIX = "weight.packed"

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class ExportInfo:
    """What :func:`export` wrote.

    ``file_bytes = header_bytes + packed_weight_bytes + qparam_bytes + float_bytes``
    and ``packed_weight_bytes + qparam_bytes == config.size_bytes``.
    """

    path: str
    file_bytes: int
    packed_weight_bytes: int
    qparam_bytes: int
    float_bytes: int
    header_bytes: int

    @property
    def quantized_bytes(self) -> int:
        """Packed codes plus scales and zero points (= ``BitConfig.size_bytes``)."""
        return self.packed_weight_bytes + self.qparam_bytes


def _safetensors():
    try:
        from safetensors import safe_open
        from safetensors.torch import save as save_file  # bytes, written atomically by the caller
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise ImportError("mixquant.export needs the 'safetensors' package: pip install safetensors") from exc
    return safe_open, save_file


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _layer_codes(layer: nn.Module, name: str) -> torch.Tensor:
    """Integer codes of a quantized layer, checked to reproduce its stored weight exactly."""
    w = layer.weight.detach().cpu().float()
    scale = layer.weight_scale.detach().cpu()
    zp = layer.weight_zero_point.detach().cpu()
    bits, ch = layer.mixquant_bits, layer.mixquant_ch_axis
    codes = quantize_tensor(w, scale, zp, bits, ch_axis=ch)
    if not torch.equal(qmodules.dequantize_weight(codes, scale, zp, ch), w):
        raise RuntimeError(
            f"layer {name!r}: its weight is no longer on its quantization grid (was it modified after quantize?)"
        )
    return codes


def export(qmodel: nn.Module, path: PathLike, *, overwrite: bool = False) -> ExportInfo:
    """Write ``qmodel`` (from :func:`mixquant.quantize`) to ``path`` as safetensors with packed integer weights.

    The file is written atomically (temporary file, then rename); an existing
    ``path`` raises FileExistsError unless ``overwrite``.

    Returns an :class:`ExportInfo` with the size of each part. Raises
    ValueError for a model that :func:`mixquant.quantize` did not produce and
    RuntimeError when a quantized weight was changed afterwards.
    """
    _, save_file = _safetensors()
    state = _state(qmodel)
    tensors: Dict[str, torch.Tensor] = {}
    layers_meta = {}
    packed_bytes = qparam_bytes = 0
    for name, bits in state.config.bits.items():
        layer = submodule(qmodel, name)
        codes = _layer_codes(layer, name)
        packed = torch.from_numpy(pack_bits(codes.reshape(-1), bits).copy())
        p = _prefix(name)
        tensors[p + PACKED_SUFFIX] = packed
        tensors[p + "weight_scale"] = layer.weight_scale.detach().cpu().float().contiguous()
        tensors[p + "weight_zero_point"] = layer.weight_zero_point.detach().cpu().to(torch.int32).contiguous()
        packed_bytes += packed.numel()
        qparam_bytes += 8 * layer.weight_scale.numel()
        layers_meta[name] = {"bits": bits, "shape": list(layer.weight.shape), "ch_axis": layer.mixquant_ch_axis,
                             "dtype": str(layer.weight.dtype).replace("torch.", "")}
    skip = set(quantized_keys(state))
    float_bytes = 0
    for key, value in qmodel.state_dict().items():
        if key in skip:
            continue
        t = value.detach().cpu().clone().contiguous()  # clone: safetensors refuses shared storage
        tensors[key] = t
        float_bytes += t.numel() * t.element_size()
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "method": state.method,
        # The error tables of a searched config are not needed to load the model.
        "config": json.dumps(dataclasses.replace(state.config, errors={}).to_dict()),
        "layers": json.dumps(layers_meta),
        "input_act_bits": json.dumps(state.input_act_bits),
        "output_act_bits": json.dumps(state.output_act_bits),
        "act_bits": json.dumps(state.act_bits),
        "folded_bn": json.dumps(state.folded_bn),
        "per_channel": json.dumps(state.per_channel),
        "symmetric": json.dumps(state.symmetric),
        "requested_bits": json.dumps(state.requested_bits),
    }
    path = os.fspath(path)
    payload = save_file(tensors, metadata=metadata)
    write_bytes_atomic(path, payload, overwrite)
    file_bytes = len(payload)
    header = file_bytes - packed_bytes - qparam_bytes - float_bytes
    return ExportInfo(path, file_bytes, packed_bytes, qparam_bytes, float_bytes, header)


MAX_HEADER_BYTES = 100 * 2**20
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _bad(path: str, msg: str) -> ValueError:
    return ValueError(f"{path!r} is not a mixquant quantized-model file, or it is damaged: {msg}")


def _check_layout(path: str) -> None:
    """Check the safetensors framing ourselves before any tensor is read.

    The header length, every tensor's dtype, shape and byte range must be
    consistent, and the byte ranges must tile the data section exactly (no
    overlap, no gap, no trailing bytes).
    """
    if os.path.isdir(path):
        raise _bad(path, "it is a directory")
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _bad(path, f"only {size} bytes, shorter than the 8-byte header length")
        n = struct.unpack("<Q", head)[0]
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise _bad(path, f"header length {n} exceeds the file ({size} bytes)")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise _bad(path, "metadata must map names to strings")
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPE_BYTES:
            raise _bad(path, f"tensor {key!r} has no known dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise _bad(path, f"tensor {key!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise _bad(path, f"tensor {key!r} has invalid data offsets {offsets!r}")
        if math.prod(shape) * _DTYPE_BYTES[entry["dtype"]] != offsets[1] - offsets[0]:
            raise _bad(path, f"tensor {key!r}: shape {shape} and dtype {entry['dtype']} do not match its byte range")
        spans.append((offsets[0], offsets[1], key))
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            raise _bad(path, f"tensor {key!r} overlaps another or leaves a gap in the data")
        position = end
    if 8 + n + position != size:
        raise _bad(path, f"data section holds {size - 8 - n} bytes, the tensors {position}")


def _read(path: str):
    """Metadata and tensors of a safetensors file, every framing error as ValueError."""
    safe_open, _ = _safetensors()
    _check_layout(path)
    try:
        with safe_open(path, framework="pt") as fh:
            return dict(fh.metadata() or {}), {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:  # the reader's own errors: one type for the caller
        raise _bad(path, str(exc)) from None


def _meta(metadata: Dict[str, str], key: str, path: str):
    if key not in metadata:
        raise _bad(path, f"metadata entry {key!r} is missing")
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise _bad(path, f"metadata entry {key!r} is not valid JSON ({exc})") from None


def _bits_map(value, what: str, path: str, lo: int, hi: int) -> Dict[str, int]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
        for k, v in value.items()
    ):
        raise _bad(path, f"{what} must map names to bit-widths in {lo}..{hi}")
    return value


def _layer_tensors(tensors, name: str, spec, config: BitConfig, path: str):
    """The codes, scale and zero point of one layer, each checked against the config."""
    if not isinstance(spec, dict):
        raise _bad(path, f"layer {name!r}: entry must be an object")
    bits, shape, axis = spec.get("bits"), spec.get("shape"), spec.get("ch_axis")
    if not isinstance(bits, int) or isinstance(bits, bool) or bits != config.bits[name]:
        raise _bad(path, f"layer {name!r}: bits {bits!r} disagree with the config ({config.bits[name]})")
    if not isinstance(shape, list) or tuple(shape) != tuple(config.shapes[name]):
        raise _bad(path, f"layer {name!r}: shape {shape!r} disagrees with the config {config.shapes[name]}")
    if not isinstance(axis, int) or isinstance(axis, bool) or not 0 <= axis < len(shape):
        raise _bad(path, f"layer {name!r}: invalid channel axis {axis!r}")
    p = _prefix(name)
    try:
        packed, scale, zp = (tensors.pop(p + k) for k in (PACKED_SUFFIX, "weight_scale", "weight_zero_point"))
    except KeyError as exc:
        raise _bad(path, f"layer {name!r}: tensor {exc.args[0]!r} is missing") from None
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n * bits + 7) // 8:
        raise _bad(path, f"layer {name!r}: packed codes must be {(n * bits + 7) // 8} uint8 bytes, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    groups = config.groups[name]
    if groups not in (1, shape[axis]):
        raise _bad(path, f"layer {name!r}: {groups} groups do not fit axis {axis} of {shape}")
    for t, dtype, label in ((scale, torch.float32, "scale"), (zp, torch.int32, "zero point")):
        if t.dtype != dtype or t.dim() != 1 or t.numel() != groups:
            raise _bad(path, f"layer {name!r}: {label} must be {groups} {dtype} values, got {t.dtype} {tuple(t.shape)}")
    if not torch.isfinite(scale).all() or (scale < torch.finfo(torch.float32).tiny).any():
        raise _bad(path, f"layer {name!r}: scales must be finite and positive")
    if (zp < 0).any() or (zp > 2**bits - 1).any():
        raise _bad(path, f"layer {name!r}: zero points must lie in [0, {2**bits - 1}]")
    codes = torch.from_numpy(unpack_bits(packed.numpy(), bits, n).astype("int32")).reshape(shape)
    return codes, scale, zp, bits, axis


def load_quantized(path: PathLike, model: nn.Module) -> nn.Module:
    """Rebuild a quantized model from :func:`export`'s file into ``model``, a fresh float instance of the architecture.

    ``model`` is modified in place (batch norms folded structurally, weights
    set from the integer codes, activation quantizers attached) and returned in
    eval mode; its outputs are bit-identical to the exported model's on the
    same device. Every field of the file is validated first: a damaged,
    tampered or foreign file, or one that does not fit ``model``, raises
    ValueError and leaves ``model`` untouched (the work is done on a copy).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if hasattr(model, "mixquant_state"):
        raise ValueError("model is already quantized; pass a fresh float instance")
    path = os.fspath(path)
    metadata, tensors = _read(path)
    if metadata.get("format") != FORMAT:
        raise _bad(path, f"format {metadata.get('format')!r} is not {FORMAT!r}")
    if metadata.get("version") != str(VERSION):
        raise _bad(path, f"unsupported version {metadata.get('version')!r} (this mixquant reads {VERSION})")
    try:
        config = BitConfig.from_dict(_meta(metadata, "config", path))
    except ValueError as exc:
        raise _bad(path, str(exc)) from None
    layers_meta = _meta(metadata, "layers", path)
    if not isinstance(layers_meta, dict) or set(layers_meta) != set(config.bits):
        raise _bad(path, "the layer list does not match the config")
    folded = _meta(metadata, "folded_bn", path)
    if not isinstance(folded, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair) for pair in folded
    ):
        raise _bad(path, "folded_bn must be a list of [layer, batch norm] name pairs")
    inputs = _bits_map(_meta(metadata, "input_act_bits", path), "input_act_bits", path, MIN_ACT_BITS, MAX_ACT_BITS)
    outputs = _bits_map(_meta(metadata, "output_act_bits", path), "output_act_bits", path, MIN_ACT_BITS, MAX_ACT_BITS)
    requested = _bits_map(_meta(metadata, "requested_bits", path), "requested_bits", path, MIN_BITS, MAX_BITS)
    act_bits = _meta(metadata, "act_bits", path)
    if act_bits is not None and (not isinstance(act_bits, int) or isinstance(act_bits, bool)
                                 or not MIN_ACT_BITS <= act_bits <= MAX_ACT_BITS):
        raise _bad(path, f"act_bits {act_bits!r} is not an activation bit-width ({MIN_ACT_BITS}..{MAX_ACT_BITS})")
    flags = {k: _meta(metadata, k, path) for k in ("per_channel", "symmetric")}
    if not all(isinstance(v, bool) for v in flags.values()):
        raise _bad(path, "per_channel and symmetric must be true or false")

    work = copy.deepcopy(model)
    try:
        config.check_model(work)
        apply_fold_structure(work, [tuple(pair) for pair in folded])
        modules = dict(work.named_modules())
        missing = [n for n in list(inputs) + list(outputs) if n not in modules]
        if missing:
            raise ValueError(f"it has no module {missing[0]!r} for an activation quantizer")
    except (AttributeError, ValueError, TypeError) as exc:
        raise ValueError(f"{path!r} does not fit this model: {exc}") from None
    device = next((p.device for p in work.parameters()), torch.device("cpu"))
    state_dict: Dict[str, torch.Tensor] = {}
    for name in config.bits:
        codes, scale, zp, bits, axis = _layer_tensors(tensors, name, layers_meta[name], config, path)
        layer = submodule(work, name)
        qmodules.set_quantized_weight(layer, codes, scale, zp, bits, axis)
        # a TorchScript layer holds its scale and zero point outside the state_dict
        for key in ("weight",) if is_scripted(layer) else ("weight", "weight_scale", "weight_zero_point"):
            state_dict[_prefix(name) + key] = getattr(layer, key).detach()
    qmodules.attach_activations(work, inputs, outputs)
    expected = work.state_dict()
    for key, value in tensors.items():
        if key not in expected:
            raise _bad(path, f"tensor {key!r} does not belong to this model")
        if value.dtype != expected[key].dtype or value.shape != expected[key].shape:
            raise _bad(path, f"tensor {key!r} is {value.dtype} {tuple(value.shape)}, the model needs "
                             f"{expected[key].dtype} {tuple(expected[key].shape)}")
    state_dict.update(tensors)
    try:
        work.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path!r} does not fit this model: {exc}") from None
    if not is_scripted(work):  # a TorchScript model stays where it was loaded (its .to() warns)
        work.to(device)
    work.eval()
    work.mixquant_state = QuantState(
        method=str(metadata.get("method", "unknown")), config=config, requested_bits=dict(requested),
        per_channel=flags["per_channel"], symmetric=flags["symmetric"], act_bits=act_bits,
        input_act_bits=dict(inputs), output_act_bits=dict(outputs), folded_bn=[(a, b) for a, b in folded],
    )
    work.mixquant_report = None
    # Success: the caller's model object takes over the loaded contents.
    model.__dict__.clear()
    model.__dict__.update(work.__dict__)
    return model
