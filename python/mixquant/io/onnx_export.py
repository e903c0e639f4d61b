"""ONNX export of a quantized model as a QDQ graph that ONNX Runtime (or any ONNX runtime) executes.

Each quantized weight is an integer initializer in the narrowest ONNX container
that holds its codes, followed by ``DequantizeLinear`` with its scales and zero
points (per channel along the layer's channel axis, or per tensor):

=========  ==================================  =====================================
bits       asymmetric (codes 0..2^b-1, zp)     symmetric (zp = 2^(b-1) everywhere)
=========  ==================================  =====================================
1..4       ``uint4``                           ``int4``  (code - 2^(b-1), zp 0)
5..8       ``uint8``                           ``int8``
9..16      ``uint16``                          ``int16``
=========  ==================================  =====================================

ONNX has no 2- or 3-bit type a runtime executes, so 1-3-bit codes sit in 4-bit
containers: :class:`OnnxExportInfo` reports, per layer, the container's bytes
and what they cost over packing at the layer's own width. Activation
quantizers (``act_bits``) become ``QuantizeLinear``/``DequantizeLinear`` pairs
(``uint8`` for up to 8 bits, ``uint16`` above), with an integer ``Clip`` of the
codes for widths narrower than their container.

How it is built: the graph comes from PyTorch's exporter (``torch.onnx.export``,
``dynamo=True``, its graph optimizer on). On a copy of the model, each
quantized layer's ``weight`` becomes the output of a custom op
``mixquant::dequantize_weight`` over integer code buffers, and each activation
quantizer calls ``mixquant::fake_quantize_act``; the exporter traces them, and
its ``custom_translation_table`` maps them (written here in onnxscript) to
``DequantizeLinear`` and ``QuantizeLinear`` + ``Clip`` + ``DequantizeLinear``.
Written by hand, after export: the removal of the exporter's per-node
debug metadata (stack traces with the exporting machine's file paths, about
half of a small model's file), the narrowing of 1-4-bit codes and zero
points from ``uint8``/``int8`` to ``uint4``/``int4`` initializers (PyTorch has
no 4-bit dtype to trace with), and the check that every code initializer is
read by exactly one ``DequantizeLinear``.

Numerics: ``DequantizeLinear`` computes ``(code - zp) * scale`` in float32,
the formula of the simulated model's weights, so weights are bit-identical;
``QuantizeLinear`` computes ``saturate(round(x / scale) + zp)`` with round half
to even, the activation quantizer's formula. Outputs differ from the simulated
model only by the runtime's own convolution/matmul summation order (and, with
activation quantization, by the rare value that this moves across a rounding
boundary).
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..api.quantize import _state
from ..core.kernels import pack_bits
from ..nn import qmodules
from ..nn.packed import packed_class
from .export import _layer_codes
from .files import check_destination, write_bytes_atomic

__all__ = ["export_onnx", "OnnxExportInfo", "OnnxLayer", "DEFAULT_OPSET"]

#: Opset 21 is the first with 4-bit and 16-bit integer types in Q/DQ (and blocked scales).
DEFAULT_OPSET = 21
CODES = "weight_codes"
PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class OnnxLayer:
    """How one quantized layer is stored: its bits, the ONNX container and their sizes in bytes."""

    bits: int
    container: str            # "uint4", "int4", "uint8", "int8", "uint16" or "int16"
    numel: int
    container_bytes: int      # the code initializer in the file
    packed_bytes: int         # the same codes packed at ``bits`` (what mixquant.export stores)
    qparam_bytes: int         # scales (float32) and zero points (in the container type)

    @property
    def overhead_bytes(self) -> int:
        """Bytes the container costs over packing at the layer's own bit-width (2-3-bit codes in 4-bit cells)."""
        return self.container_bytes - self.packed_bytes


@dataclass
class OnnxExportInfo:
    """What :func:`export_onnx` wrote."""

    path: str
    file_bytes: int
    opset: int
    layers: Dict[str, OnnxLayer] = field(default_factory=dict)

    @property
    def container_bytes(self) -> int:
        return sum(v.container_bytes for v in self.layers.values())

    @property
    def overhead_bytes(self) -> int:
        """Total cost of the containers over bit-exact packing."""
        return sum(v.overhead_bytes for v in self.layers.values())

    def table(self) -> str:
        rows = [("layer", "bits", "container", "weights", "bytes", "over packed")]
        for name, v in self.layers.items():
            rows.append((name or "<model>", str(v.bits), v.container, str(v.numel), str(v.container_bytes),
                         f"+{v.overhead_bytes}" if v.overhead_bytes else "0"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"{self.path}: {self.file_bytes} bytes, opset {self.opset}; quantized weights "
                     f"{self.container_bytes} bytes in their containers, {self.overhead_bytes} more than "
                     f"packed at their own bit-widths")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _deps():
    try:
        import onnx
        import onnxscript
    except ImportError as exc:
        raise ImportError("mixquant.export_onnx needs the 'onnx' and 'onnxscript' packages: "
                          "pip install onnx onnxscript (and onnxruntime to run the result)") from exc
    return onnx, onnxscript


# ------------------------------------------------------------ custom ops ----
_OPS: Dict[str, Any] = {}


def _ops():
    """Register the two custom ops and their ONNX translations once per process."""
    if _OPS:
        return _OPS
    from onnxscript import ir
    from onnxscript import opset21 as op

    @torch.library.custom_op("mixquant::dequantize_weight", mutates_args=())
    def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                          axis: int) -> torch.Tensor:
        # The simulated model's formula (mixquant.nn.qmodules.dequantize_weight).
        shape = [1] * codes.dim()
        if scale.dim():
            shape[axis] = -1
        return (codes.to(torch.float32) - zero_point.to(torch.float32).reshape(shape)) * scale.reshape(shape)

    @dequantize_weight.register_fake
    def _(codes, scale, zero_point, axis):
        return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)

    @torch.library.custom_op("mixquant::fake_quantize_act", mutates_args=())
    def fake_quantize_act(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int) -> torch.Tensor:
        # ActQuantizer's "quant" mode.
        q = torch.clamp(torch.round(x / scale) + zero_point, 0.0, float(qmax))
        return (q - zero_point) * scale

    @fake_quantize_act.register_fake
    def _(x, scale, zero_point, qmax):
        return torch.empty_like(x)

    def dq_onnx(codes, scale, zero_point, axis: int):
        return op.DequantizeLinear(codes, scale, zero_point, axis=axis)

    def fq_onnx(x, scale, zero_point, qmax: int):
        container = ir.DataType.UINT8 if qmax <= 255 else ir.DataType.UINT16
        zp = op.Cast(zero_point, to=container)
        q = op.QuantizeLinear(x, scale, zp)
        if qmax not in (255, 65535):
            # Narrower than the container: clamp the integer codes, min(saturate(round(x/s) + zp), qmax)
            # equals torch's clamp(round(x/s) + zp, 0, qmax). (A float Clip in front of QuantizeLinear
            # would be exact too, but ONNX Runtime's Clip/QuantizeLinear fusion drops it.)
            q = op.Clip(q, op.Cast(op.Constant(value_int=0), to=container),
                        op.Cast(op.Constant(value_int=qmax), to=container))
        return op.DequantizeLinear(q, scale, zp)

    _OPS.update(table={torch.ops.mixquant.dequantize_weight.default: dq_onnx,
                       torch.ops.mixquant.fake_quantize_act.default: fq_onnx})
    return _OPS


class OnnxWeightMixin:
    """Mixed in front of a quantized layer's class for export: ``weight`` is DequantizeLinear of its codes."""

    @property
    def weight(self) -> torch.Tensor:
        b = self._buffers
        return torch.ops.mixquant.dequantize_weight(b[CODES], b["weight_scale"], b["weight_zero_point"],
                                                    self.mixquant_ch_axis)


def _container(bits: int, codes: torch.Tensor, zp: torch.Tensor, symmetric: bool):
    """Codes and zero points in the torch dtype traced with, the ONNX container's name and its width in bits."""
    width = 4 if bits <= 4 else 8 if bits <= 8 else 16
    signed = symmetric and bool((zp == 2 ** (bits - 1)).all())
    if signed:
        codes = codes.to(torch.int32) - 2 ** (bits - 1)
        zp = torch.zeros_like(zp)
    name = ("int" if signed else "uint") + str(width)
    traced = {("int", 4): torch.int8, ("int", 8): torch.int8, ("uint", 4): torch.uint8, ("uint", 8): torch.uint8,
              ("int", 16): torch.int16, ("uint", 16): torch.uint16}[("int" if signed else "uint", width)]
    return codes.to(torch.int32).to(traced), zp.to(torch.int32).to(traced), name, width


def _prepare(qmodel: nn.Module) -> Tuple[nn.Module, Dict[str, OnnxLayer]]:
    """A copy of ``qmodel`` whose quantized layers trace as DequantizeLinear and activation quantizers as Q/DQ."""
    state = _state(qmodel)
    _ops()
    work = copy.deepcopy(qmodel)
    layers: Dict[str, OnnxLayer] = {}
    for name, bits in state.config.bits.items():
        layer = work.get_submodule(name)
        if isinstance(layer, torch.jit.ScriptModule):
            raise ValueError(f"layer {name!r} is TorchScript; export_onnx needs an eager model")
        codes = _layer_codes(layer, name)
        scale = layer.weight_scale.detach().cpu().float()
        zp = layer.weight_zero_point.detach().cpu()
        axis = layer.mixquant_ch_axis
        codes, zp, container, width = _container(bits, codes, zp, state.symmetric)
        per_tensor = scale.numel() == 1 and codes.shape[axis] != 1
        if per_tensor:
            scale, zp = scale.reshape(()), zp.reshape(())
        n = codes.numel()
        layers[name] = OnnxLayer(bits, container, n, (n * width + 7) // 8, (n * bits + 7) // 8,
                                 4 * scale.numel() + (zp.numel() * width + 7) // 8)
        device = next(iter(layer.buffers())).device
        layer._parameters.pop("weight", None)
        layer._buffers.pop("weight_packed", None)
        for key, value in ((CODES, codes), ("weight_scale", scale), ("weight_zero_point", zp)):
            layer._buffers[key] = value.to(device)
        layer.__class__ = packed_class(getattr(type(layer), "_mixquant_base", type(layer)), OnnxWeightMixin)
    for _, quantizer in qmodules.act_quantizers(work):
        if quantizer.mode == "quant":
            qmax = int(quantizer.qmax)
            quantizer.forward = (lambda q, m: lambda x: torch.ops.mixquant.fake_quantize_act(
                x, q.scale.detach(), q.zero_point, m))(quantizer, qmax)
        elif quantizer.mode != "off":
            raise ValueError("an activation quantizer is in 'observe' mode; export a finished quantized model")
    return work, layers


def _narrow_to_int4(onnx, model, layers: Dict[str, OnnxLayer]) -> None:
    """Rewrite the uint8/int8 code and zero-point initializers of 1-4-bit layers as uint4/int4 (two per byte)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    readers: Dict[str, list] = {}
    for node in model.graph.node:
        for i, inp in enumerate(node.input):
            readers.setdefault(inp, []).append((node, i))
    for name, info in layers.items():
        prefix = f"{name}." if name else ""
        code_name = prefix + CODES
        uses = readers.get(code_name, [])
        if code_name not in inits or len(uses) != 1 or uses[0][0].op_type != "DequantizeLinear" or uses[0][1] != 0:
            raise RuntimeError(f"layer {name!r}: the exporter did not keep its codes {code_name!r} as the input of one "
                               f"DequantizeLinear (found {[(n.op_type, i) for n, i in uses]})")
        if not info.container.endswith("4"):
            continue
        dq = uses[0][0]
        if len(dq.input) < 3 or dq.input[2] not in inits:
            raise RuntimeError(f"layer {name!r}: the zero point of its DequantizeLinear is not an initializer")
        # The exporter may share one zero-point initializer between layers (equal values, e.g. all
        # zeros): each 4-bit layer gets its own, under its own name.
        zp_name = prefix + "weight_zero_point"
        if zp_name != dq.input[2] and zp_name in inits:
            raise RuntimeError(f"layer {name!r}: initializer {zp_name!r} is not its zero point")
        for index, (src, dst) in enumerate(((code_name, code_name), (dq.input[2], zp_name))):
            old = inits[src]
            values = numpy_helper.to_array(old).astype("int64").reshape(-1)
            raw = pack_bits((values & 0xF).astype("uint8"), 4).tobytes()
            kind = onnx.TensorProto.INT4 if info.container == "int4" else onnx.TensorProto.UINT4
            new = onnx.helper.make_tensor(dst, kind, list(old.dims), vals=raw, raw=True)
            if dst in inits:
                inits[dst].CopyFrom(new)
            else:
                model.graph.initializer.append(new)
                inits[dst] = model.graph.initializer[-1]
                dq.input[2] = dst
    # Drop the initializers nothing reads any more (a zero point every 4-bit layer left).
    used = {i for node in model.graph.node for i in node.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)


def _strip_debug_info(model) -> None:
    """Drop the exporter's per-node metadata: stack traces and module paths of the exporting machine."""
    for graph in [model.graph] + [f for f in model.functions]:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
    del model.graph.metadata_props[:]


def _example_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise TypeError("example_inputs must be a tensor or a non-empty tuple of the model's positional inputs")


def export_onnx(
    qmodel: nn.Module, path: PathLike, example_inputs: Any, *, opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True, input_names: Optional[Sequence[str]] = None,
    output_names: Optional[Sequence[str]] = None, overwrite: bool = False,
) -> OnnxExportInfo:
    """Write ``qmodel`` (from :func:`mixquant.quantize` or :func:`mixquant.load_quantized`) as a QDQ ONNX model.

    Args:
        qmodel: a quantized model; it is not modified (the export works on a copy).
        path: the ``.onnx`` file, written atomically; an existing file raises
            FileExistsError unless ``overwrite``.
        example_inputs: a tensor or a tuple of the forward's positional inputs, traced once.
        opset: ONNX opset (21 or later: 4-bit types in DequantizeLinear).
        dynamic_batch: let the first dimension of every tensor input vary.
        input_names, output_names: names of the graph's inputs and outputs.

    Returns:
        an :class:`OnnxExportInfo` with each layer's container and its cost.

    Raises:
        ValueError: a model :func:`mixquant.quantize` did not produce, TorchScript layers,
            an opset below 21. RuntimeError: a weight changed after quantization, or an
            exporter whose graph does not keep the codes as DequantizeLinear inputs.
        ImportError: onnx or onnxscript missing.
    """
    onnx, _ = _deps()
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < DEFAULT_OPSET:
        raise ValueError(f"opset must be an int >= {DEFAULT_OPSET} (4-bit types in DequantizeLinear), got {opset!r}")
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"dynamic_batch must be a bool, got {type(dynamic_batch).__name__}")
    path = check_destination(path, overwrite)  # before the (long) export
    args = _example_tuple(example_inputs)
    work, layers = _prepare(qmodel)
    work.eval()
    dynamic = None
    if dynamic_batch:
        dynamic = tuple({0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() else None for a in args)
    with warnings.catch_warnings():
        # The exporter's own deprecation chatter (torch internals), not the user's concern.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        program = torch.onnx.export(
            work, args, dynamo=True, opset_version=opset, custom_translation_table=_ops()["table"],
            dynamic_shapes=dynamic, input_names=list(input_names) if input_names else None,
            output_names=list(output_names) if output_names else None, optimize=True, verbose=False,
            external_data=False,
        )
    model = program.model_proto
    _narrow_to_int4(onnx, model, layers)
    _strip_debug_info(model)
    onnx.checker.check_model(model)
    payload = model.SerializeToString()
    write_bytes_atomic(path, payload, overwrite)
    return OnnxExportInfo(path, len(payload), opset, layers)

