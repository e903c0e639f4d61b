"""Save a quantized model with real integer weights, and load it back bit-exactly.

File format (safetensors, ``format = "mixquant.quantized"``, version 2; version 1,
which had neither groups nor ties, is still read):

* for each quantized layer ``L``: ``L.weight.packed`` (uint8, the codes
  flattened in the weight's memory order and packed LSB-first at the layer's
  bit-width by :func:`mixquant.pack_bits`), ``L.weight_scale`` (float32,
  ``[C]`` or ``[1]``) and ``L.weight_zero_point`` (int32, same shape); for a
  group-wise layer ``L.weight_scale`` is bfloat16 ``[C, G]`` and the zero points
  are ``L.weight_zero_point.packed`` (uint8, the ``C * G`` zero points in
  (row, group) order packed at the layer's bit-width);
* a tied weight once, under its layer's name (the modules sharing it are
  listed in the layer's metadata and re-tied on load);
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
import itertools
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
from ..core.kernels import pack_bits, unpack_bits
from ..core.limits import MAX_ACT_BITS, MAX_BITS, MIN_ACT_BITS, MIN_BITS
from ..nn import qmodules
from ..nn.layers import tied_weights
from ..nn.fold import apply_fold_structure
from ..nn.layers import channel_axis, is_scripted, submodule
from ..nn.packed import PACKED_KEY, pack_layer
from ..nn.parametrized import materialize_weights
from . import strict_json
from .files import check_destination, read_regular, write_bytes_atomic

__all__ = ["export", "load_quantized", "ExportInfo", "FORMAT", "VERSION"]

FORMAT = "mixquant.quantized"
VERSION = 2  # 2: group-wise layers and tied weights; version-1 files are still read
READABLE_VERSIONS = ("1", "2")
PACKED_SUFFIX = "weight.packed"
PACKED_ZP_SUFFIX = "weight_zero_point.packed"

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
    scale = layer.weight_scale.detach().cpu()
    gs = getattr(layer, "mixquant_group_size", None)
    if gs is not None and not torch.equal(scale.to(torch.bfloat16).float(), scale):
        raise RuntimeError(f"layer {name!r}: its group scales are not bfloat16 values (was it modified after quantize?)")
    codes = qmodules.grid_codes(layer)
    if codes is None:
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
    path = check_destination(path, overwrite)  # before the packing work
    tensors: Dict[str, torch.Tensor] = {}
    layers_meta = {}
    packed_bytes = qparam_bytes = 0
    for name, bits in state.config.bits.items():
        layer = submodule(qmodel, name)
        codes = _layer_codes(layer, name)
        packed = torch.from_numpy(pack_bits(codes.reshape(-1), bits).copy())
        p = _prefix(name)
        tensors[p + PACKED_SUFFIX] = packed
        packed_bytes += packed.numel()
        gs = getattr(layer, "mixquant_group_size", None)
        scale = layer.weight_scale.detach().cpu().float().contiguous()
        zp = layer.weight_zero_point.detach().cpu().to(torch.int32).contiguous()
        if gs is None:
            tensors[p + "weight_scale"] = scale
            tensors[p + "weight_zero_point"] = zp
        else:  # the stored dtypes BitConfig.size_bytes counts: bfloat16 scales, zero points packed at `bits`
            tensors[p + "weight_scale"] = scale.to(torch.bfloat16)
            tensors[p + PACKED_ZP_SUFFIX] = torch.from_numpy(pack_bits(zp.reshape(-1), bits).copy())
        qparam_bytes += sum(tensors[p + k].numel() * tensors[p + k].element_size()
                            for k in ("weight_scale", "weight_zero_point", PACKED_ZP_SUFFIX) if p + k in tensors)
        layers_meta[name] = {"bits": bits, "shape": list(layer.weight.shape), "ch_axis": layer.mixquant_ch_axis,
                             "dtype": str(layer.weight.dtype).replace("torch.", ""), "group_size": gs,
                             "tied": list(state.config.tied.get(name, []))}
    skip = set(quantized_keys(state)) | {_prefix(name) + PACKED_KEY for name in state.config.bits}
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
    payload = _canonical(save_file(tensors, metadata=metadata))
    write_bytes_atomic(path, payload, overwrite)
    file_bytes = len(payload)
    header = file_bytes - packed_bytes - qparam_bytes - float_bytes
    return ExportInfo(path, file_bytes, packed_bytes, qparam_bytes, float_bytes, header)


def _canonical(payload: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted, so equal models give equal bytes.

    The writer keeps metadata in a hash map whose order changes from call to
    call; the tensor data (and every offset into it) is left as it is.
    """
    n = struct.unpack("<Q", payload[:8])[0]
    header = json.loads(payload[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data section stays 8-byte aligned
    return struct.pack("<Q", len(text)) + text + payload[8 + n:]


MAX_HEADER_BYTES = 100 * 2**20
MAX_FILE_BYTES = 2**40
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _bad(path: str, msg: str) -> ValueError:
    return ValueError(f"{path!r} is not a mixquant quantized-model file, or it is damaged: {msg}")


def _check_layout(raw: bytes, path: str) -> dict:
    """Check the safetensors framing of ``raw`` ourselves before any tensor is read; return the header.

    The header length, every tensor's dtype, shape and byte range must be
    consistent, and the byte ranges must tile the data section exactly (no
    overlap, no gap, no trailing bytes). The header is strict JSON of bounded depth.
    """
    size = len(raw)
    if size < 8:
        raise _bad(path, f"only {size} bytes, shorter than the 8-byte header length")
    n = struct.unpack("<Q", raw[:8])[0]
    if n > min(size - 8, MAX_HEADER_BYTES):
        raise _bad(path, f"header length {n} exceeds the file ({size} bytes)")
    try:
        header = strict_json.loads(raw[8:8 + n])
    except ValueError as exc:
        raise _bad(path, f"header: {exc}") from None
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
    return header


def _read(path: str):
    """Metadata and tensors of a safetensors file, every framing error as ValueError.

    The file is read once, from a descriptor checked to be a regular file (a
    FIFO is refused, not waited on), and parsed from those bytes.
    """
    raw = read_regular(path, MAX_FILE_BYTES, "quantized-model file")
    header = _check_layout(raw, path)
    try:
        from safetensors.torch import load as load_bytes

        tensors = load_bytes(raw)
    except Exception as exc:  # the reader's own errors: one type for the caller
        raise _bad(path, str(exc)) from None
    return dict(header.get("__metadata__", {})), tensors


def _meta(metadata: Dict[str, str], key: str, path: str):
    if key not in metadata:
        raise _bad(path, f"metadata entry {key!r} is missing")
    try:
        return strict_json.loads(metadata[key])
    except ValueError as exc:  # invalid, or nested deeper than any file export writes
        raise _bad(path, f"metadata entry {key!r}: {exc}") from None


def _bits_map(value, what: str, path: str, lo: int, hi: int) -> Dict[str, int]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
        for k, v in value.items()
    ):
        raise _bad(path, f"{what} must map names to bit-widths in {lo}..{hi}")
    return value


def _layer_tensors(tensors, name: str, spec, config: BitConfig, layer: nn.Module, path: str):
    """The codes, scale and zero point of one layer, each checked against the config and the model's layer."""
    if not isinstance(spec, dict):
        raise _bad(path, f"layer {name!r}: entry must be an object")
    bits, shape, axis = spec.get("bits"), spec.get("shape"), spec.get("ch_axis")
    if not isinstance(bits, int) or isinstance(bits, bool) or bits != config.bits[name]:
        raise _bad(path, f"layer {name!r}: bits {bits!r} disagree with the config ({config.bits[name]})")
    if not isinstance(shape, list) or tuple(shape) != tuple(config.shapes[name]):
        raise _bad(path, f"layer {name!r}: shape {shape!r} disagrees with the config {config.shapes[name]}")
    if not isinstance(axis, int) or isinstance(axis, bool) or axis != channel_axis(layer):
        raise _bad(path, f"layer {name!r}: channel axis {axis!r} is not the {type(layer).__name__}'s "
                         f"({channel_axis(layer)})")
    dtype = str(layer.weight.dtype).replace("torch.", "")
    if spec.get("dtype") != dtype:
        raise _bad(path, f"layer {name!r}: the file holds a {spec.get('dtype')!r} weight, the model's is {dtype} "
                         "(convert the model to the exported dtype first)")
    gs = spec.get("group_size")
    if gs != config.group_size_of(name) or isinstance(gs, bool):
        raise _bad(path, f"layer {name!r}: group size {gs!r} disagrees with the config ({config.group_size_of(name)})")
    p = _prefix(name)
    zp_key = "weight_zero_point" if gs is None else PACKED_ZP_SUFFIX
    try:
        packed, scale, zp = (tensors.pop(p + k) for k in (PACKED_SUFFIX, "weight_scale", zp_key))
    except KeyError as exc:
        raise _bad(path, f"layer {name!r}: tensor {exc.args[0]!r} is missing") from None
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n * bits + 7) // 8:
        raise _bad(path, f"layer {name!r}: packed codes must be {(n * bits + 7) // 8} uint8 bytes, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    groups = config.groups[name]
    if gs is None:
        if groups not in (1, shape[axis]):
            raise _bad(path, f"layer {name!r}: {groups} groups do not fit axis {axis} of {shape}")
        for t, dtype, label in ((scale, torch.float32, "scale"), (zp, torch.int32, "zero point")):
            if t.dtype != dtype or t.dim() != 1 or t.numel() != groups:
                raise _bad(path, f"layer {name!r}: {label} must be {groups} {dtype} values, got {t.dtype} "
                                 f"{tuple(t.shape)}")
    else:
        rows = shape[axis]
        per_row = -(-(n // rows) // gs)
        if groups != rows * per_row:
            raise _bad(path, f"layer {name!r}: {groups} groups do not fit {rows} rows of groups of {gs}")
        if scale.dtype != torch.bfloat16 or tuple(scale.shape) != (rows, per_row):
            raise _bad(path, f"layer {name!r}: group scales must be bfloat16 [{rows}, {per_row}], got {scale.dtype} "
                             f"{tuple(scale.shape)}")
        if zp.dtype != torch.uint8 or zp.dim() != 1 or zp.numel() != (groups * bits + 7) // 8:
            raise _bad(path, f"layer {name!r}: packed zero points must be {(groups * bits + 7) // 8} uint8 bytes, "
                             f"got {zp.dtype} {tuple(zp.shape)}")
        scale = scale.float()
        zp = torch.from_numpy(unpack_bits(zp.numpy(), bits, groups).astype("int32")).reshape(rows, per_row)
    if not torch.isfinite(scale).all() or (scale < torch.finfo(torch.float32).tiny).any():
        raise _bad(path, f"layer {name!r}: scales must be finite and positive")
    if (zp < 0).any() or (zp > 2**bits - 1).any():
        raise _bad(path, f"layer {name!r}: zero points must lie in [0, {2**bits - 1}]")
    return packed, scale, zp, bits, axis, gs


def _unpacked(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    return torch.from_numpy(unpack_bits(packed.numpy(), bits, math.prod(shape)).astype("int32")).reshape(shape)


def _check_act_owners(model: nn.Module, config: BitConfig, inputs: Dict[str, int], outputs: Dict[str, int]) -> None:
    """Input quantizers sit on quantized layers; output quantizers on blocks that hold quantized layers."""
    modules = dict(model.named_modules())
    for name in inputs:
        if name not in config.bits:
            raise ValueError(f"an input quantizer names {name!r}, which is not a quantized layer")
    for name in outputs:
        if name not in modules:
            raise ValueError(f"it has no module {name!r} for an output quantizer")
        if name in config.bits or not any(n.startswith(_prefix(name)) and n != name for n in config.bits):
            raise ValueError(f"an output quantizer names {name!r} ({type(modules[name]).__name__}), "
                             "which is not a block of quantized layers")


def _check_values(model: nn.Module, tensors: Dict[str, torch.Tensor], inputs: Dict[str, int],
                  outputs: Dict[str, int], path: str) -> None:
    """Every value the file holds is usable: finite floats, BN variances >= 0, activation grids that exist."""
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise _bad(path, f"tensor {key!r} holds NaN or Inf")
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            var = tensors.get(_prefix(name) + "running_var")
            if var is not None and bool((var < 0).any()):
                raise _bad(path, f"batch norm {name!r}: running_var holds negative values")
    for owners, attr in ((inputs, qmodules.INPUT_QUANTIZER), (outputs, qmodules.OUTPUT_QUANTIZER)):
        for name, bits in owners.items():
            key = f"{_prefix(name)}{attr}"
            scale, zp = tensors.get(key + ".scale"), tensors.get(key + ".zero_point")
            if scale is None or zp is None:
                raise _bad(path, f"activation quantizer {key!r}: its scale or zero point is missing")
            if not bool((scale >= torch.finfo(torch.float32).tiny).all()):
                raise _bad(path, f"activation quantizer {key!r}: scale {scale.tolist()} is not positive")
            if not bool(((zp == zp.round()) & (zp >= 0) & (zp <= 2**bits - 1)).all()):
                raise _bad(path, f"activation quantizer {key!r}: zero point {zp.tolist()} is not an integer "
                                 f"in [0, {2**bits - 1}]")


def load_quantized(path: PathLike, model: nn.Module, *, packed: Union[bool, str] = False) -> nn.Module:
    """Rebuild a quantized model from :func:`export`'s file into ``model``, a fresh float instance of the architecture.

    ``model`` is modified in place (batch norms folded structurally, weights
    set from the integer codes, activation quantizers attached) and returned in
    eval mode; its outputs are bit-identical to the exported model's on the
    same device. Every field of the file is validated first: a damaged,
    tampered or foreign file, or one that does not fit ``model``, raises
    ValueError and leaves ``model`` untouched (the work is done on a copy).

    With ``packed=True`` the quantized layers keep their codes packed at
    their bit-width (``weight_packed``, plus scales and zero points) and decode
    their weight in every forward with the native unpack-and-dequantize kernel
    (:mod:`mixquant.nn.packed`): the model holds about ``BitConfig.size_bytes``
    for those layers instead of 4 bytes a weight, and its outputs are
    bit-identical to the unpacked model's.

    ``packed="fused"`` is ``packed=True`` plus, for ``nn.Linear`` layers, the fused
    matrix-vector kernel on one-row inputs (batch 1 x 1 token: a language model's
    decoding step): the output is computed from the codes without decoding the
    weight, and is close to the unpacked model's but not bit-identical (within
    float32 rounding of each row's sum; :func:`mixquant.packed_matvec` states the
    bound). Every other input keeps the bit-identical decode. It is a separate
    choice so that ``packed=True`` keeps its bit-for-bit promise.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(packed, str):
        if packed != "fused":
            raise ValueError(f"packed must be True, False or 'fused', got {packed!r}")
    elif not isinstance(packed, bool):
        raise TypeError(f"packed must be a bool or 'fused', got {type(packed).__name__}")
    if hasattr(model, "mixquant_state"):
        raise ValueError("model is already quantized; pass a fresh float instance")
    meta = next((n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta), None)
    if meta is not None:
        raise ValueError(f"model has tensors on the meta device, without data ({meta!r} is one); build it on a "
                         "real device, e.g. the CPU, before loading into it")
    path = os.fspath(path)
    metadata, tensors = _read(path)
    if metadata.get("format") != FORMAT:
        raise _bad(path, f"format {metadata.get('format')!r} is not {FORMAT!r}")
    if metadata.get("version") not in READABLE_VERSIONS:
        raise _bad(path, f"unsupported version {metadata.get('version')!r} (this mixquant reads "
                         f"{', '.join(READABLE_VERSIONS)})")
    config_dict = _meta(metadata, "config", path)
    try:
        config = BitConfig.from_dict(config_dict)
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
        materialize_weights(work, [n for n in config.bits if n in dict(work.named_modules())])
        config.check_model(work)
        ties = tied_weights(work, config.bits)
        if ties != config.tied:
            name = next(n for n in set(ties) | set(config.tied) if ties.get(n) != config.tied.get(n))
            raise ValueError(f"layer {name!r} shares its weight with {ties.get(name, [])} in this model, with "
                             f"{config.tied.get(name, [])} in the file")
        apply_fold_structure(work, [tuple(pair) for pair in folded])
        _check_act_owners(work, config, inputs, outputs)
    except (AttributeError, ValueError, TypeError) as exc:
        raise ValueError(f"{path!r} does not fit this model: {exc}") from None
    device = next((p.device for p in work.parameters()), torch.device("cpu"))
    state_dict: Dict[str, torch.Tensor] = {}
    for name in config.bits:
        layer = submodule(work, name)
        codes, scale, zp, bits, axis, gs = _layer_tensors(tensors, name, layers_meta[name], config, layer, path)
        if packed:
            if is_scripted(layer):
                raise ValueError(f"{path!r}: the packed runtime replaces modules, which a TorchScript model does not "
                                 "allow (load it unpacked)")
            if gs is not None:
                raise ValueError(f"{path!r}: layer {name!r} has groups of {gs}; the packed runtime decodes "
                                 "per-channel and per-tensor layers only (load it unpacked)")
            try:
                pack_layer(layer, codes, scale, zp, bits, axis, name, fused=packed == "fused")
            except ValueError as exc:
                raise ValueError(f"{path!r} cannot be loaded packed into this model: {exc}") from None
            keys = (PACKED_KEY, "weight_scale", "weight_zero_point")
        else:
            qmodules.set_quantized_weight(layer, _unpacked(codes, bits, config.shapes[name]), scale, zp, bits, axis,
                                          gs)
            # a TorchScript layer holds its scale and zero point outside the state_dict
            keys = ("weight",) if is_scripted(layer) else ("weight", "weight_scale", "weight_zero_point")
        for key in keys:
            state_dict[_prefix(name) + key] = getattr(layer, key).detach()
        for alias in config.tied.get(name, []):  # the same Parameter: it already holds the quantized values
            state_dict[_prefix(alias) + "weight"] = layer.weight.detach()
    owned = set(state_dict)
    shadow = next((k for k in tensors if k in owned), None)
    if shadow is not None:  # a float copy would overwrite the quantized weight (or a tied alias of it)
        raise _bad(path, f"tensor {shadow!r} belongs to a quantized layer and must not be stored as a float tensor")
    qmodules.attach_activations(work, inputs, outputs)
    expected = work.state_dict()
    for key, value in tensors.items():
        if key not in expected:
            raise _bad(path, f"tensor {key!r} does not belong to this model")
        if value.dtype != expected[key].dtype or value.shape != expected[key].shape:
            raise _bad(path, f"tensor {key!r} is {value.dtype} {tuple(value.shape)}, the model needs "
                             f"{expected[key].dtype} {tuple(expected[key].shape)}")
    _check_values(work, tensors, inputs, outputs, path)
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
    model.__class__ = work.__class__  # a parametrized model's class is rolled back too
    return model
