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

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Dict, Union

import torch
import torch.nn as nn

from . import qmodules
from .bitconfig import BitConfig
from .fold import apply_fold_structure
from .kernels import pack_bits, quantize_tensor, unpack_bits
from .methods.common import attach_activations
from .quantize import QuantState, _state, quantized_keys

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
        from safetensors.torch import save_file
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


def export(qmodel: nn.Module, path: PathLike) -> ExportInfo:
    """Write ``qmodel`` (from :func:`mixquant.quantize`) to ``path`` as safetensors with packed integer weights.

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
        layer = qmodel.get_submodule(name)
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
    save_file(tensors, path, metadata=metadata)
    file_bytes = os.path.getsize(path)
    header = file_bytes - packed_bytes - qparam_bytes - float_bytes
    return ExportInfo(path, file_bytes, packed_bytes, qparam_bytes, float_bytes, header)


def _meta(metadata: Dict[str, str], key: str, path: str):
    if key not in metadata:
        raise ValueError(f"{path!r}: metadata entry {key!r} is missing")
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path!r}: metadata entry {key!r} is not valid JSON ({exc})") from None


def load_quantized(path: PathLike, model: nn.Module) -> nn.Module:
    """Rebuild a quantized model from :func:`export`'s file into ``model``, a fresh float instance of the architecture.

    ``model`` is modified in place (batch norms folded structurally, weights
    set from the integer codes, activation quantizers attached) and returned in
    eval mode; its outputs are bit-identical to the exported model's on the
    same device. Raises ValueError when the file is not a mixquant file or does
    not fit ``model``.
    """
    safe_open, _ = _safetensors()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if hasattr(model, "mixquant_state"):
        raise ValueError("model is already quantized; pass a fresh float instance")
    path = os.fspath(path)
    with safe_open(path, framework="pt") as fh:
        metadata = fh.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path!r} is not a mixquant quantized-model file")
        if metadata.get("version") != str(VERSION):
            raise ValueError(f"{path!r}: unsupported version {metadata.get('version')!r} (this mixquant reads {VERSION})")
        tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    config = BitConfig.from_dict(_meta(metadata, "config", path))
    layers_meta = _meta(metadata, "layers", path)
    folded = [tuple(pair) for pair in _meta(metadata, "folded_bn", path)]
    inputs = _meta(metadata, "input_act_bits", path)
    outputs = _meta(metadata, "output_act_bits", path)

    try:
        config.check_model(model)
        apply_fold_structure(model, folded)
    except (AttributeError, ValueError) as exc:
        raise ValueError(f"{path!r} does not fit this model: {exc}") from exc
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    state_dict: Dict[str, torch.Tensor] = {}
    for name, spec in layers_meta.items():
        p = _prefix(name)
        layer = model.get_submodule(name)
        shape = tuple(spec["shape"])
        if tuple(layer.weight.shape) != shape:
            raise ValueError(f"{path!r}: layer {name!r} has weight shape {tuple(layer.weight.shape)}, the file {shape}")
        n = math.prod(shape)
        codes = torch.from_numpy(unpack_bits(tensors.pop(p + PACKED_SUFFIX), spec["bits"], n).astype("int32"))
        scale, zp = tensors.pop(p + "weight_scale"), tensors.pop(p + "weight_zero_point")
        qmodules.set_quantized_weight(layer, codes.reshape(shape), scale, zp, spec["bits"], spec["ch_axis"])
        for key in ("weight", "weight_scale", "weight_zero_point"):
            state_dict[p + key] = getattr(layer, key).detach()
    attach_activations(model, inputs, outputs)
    state_dict.update(tensors)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path!r} does not fit this model: {exc}") from exc
    model.to(device)
    model.eval()
    model.mixquant_state = QuantState(
        method=metadata.get("method", "unknown"), config=config,
        requested_bits={k: int(v) for k, v in _meta(metadata, "requested_bits", path).items()},
        per_channel=bool(_meta(metadata, "per_channel", path)), symmetric=bool(_meta(metadata, "symmetric", path)),
        act_bits=_meta(metadata, "act_bits", path), input_act_bits={k: int(v) for k, v in inputs.items()},
        output_act_bits={k: int(v) for k, v in outputs.items()}, folded_bn=[(a, b) for a, b in folded],
    )
    model.mixquant_report = None
    return model
