"""Vanilla asymmetric uniform quantization: round-to-nearest weights, min/max activation ranges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..core.kernels import quantize_tensor
from ..core.limits import CLIP_METHODS
from ..core.ranges import spec_qparams
from ..core.spec import QuantizerSpec
from ..nn import qmodules
from ..nn.fold import fold_bn_pairs
from ..nn.layers import channel_axis, submodule
from .blocks import build_units
from .common import MethodResult, QuantJob, check_optional_bits, check_type, observe_activations, plan_activations

__all__ = ["AsymmetricOptions", "quantize_asymmetric", "quantize_weights_rtn"]


@dataclass
class AsymmetricOptions:
    """Options of ``method="asymmetric"``.

    Attributes:
        clip: weight range rule: "minmax" (full range) or "mse" (clipping-range
            search with the native kernel, lowest Lp error); None (default) = the config's ``clip``.
        p: norm of the "mse" search error (``sum |w - w_hat|^p``); None (default) = the config's ``p``.
        fold_bn: fold batch norms into the preceding layers before quantizing. Default False.
        first_layer_input_bits: bits of the model input (the first layer's
            input) when ``act_bits`` is set; None leaves it in float. Default 8.
        last_layer_input_bits: bits of the last layer's input; None = ``act_bits``. Default None.
        quantize_block_outputs: also quantize the output of every residual block
            (after the add). Default False.
        num_samples: calibration samples used for activation ranges (None: all). Default None.
        batch_size: batch size of the calibration passes. Default 64.
    """

    clip: Optional[str] = None
    p: Optional[float] = None
    fold_bn: bool = False
    first_layer_input_bits: Optional[int] = 8
    last_layer_input_bits: Optional[int] = None
    quantize_block_outputs: bool = False
    num_samples: Optional[int] = None
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.clip is not None and self.clip not in CLIP_METHODS:
            raise ValueError(f"clip must be one of {CLIP_METHODS} or None, got {self.clip!r}")
        if self.p is not None:
            check_type(self.p, (int, float), "p")
            if not self.p > 0:
                raise ValueError(f"p must be > 0 or None, got {self.p}")
        for name in ("fold_bn", "quantize_block_outputs"):
            check_type(getattr(self, name), bool, name)
        check_optional_bits(self.first_layer_input_bits, "first_layer_input_bits")
        check_optional_bits(self.last_layer_input_bits, "last_layer_input_bits")
        if self.num_samples is not None:
            check_type(self.num_samples, int, "num_samples")
            if self.num_samples < 1:
                raise ValueError(f"num_samples must be >= 1 or None, got {self.num_samples}")
        check_type(self.batch_size, int, "batch_size")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def applied_spec(job: QuantJob, options: AsymmetricOptions, name: Optional[str] = None) -> QuantizerSpec:
    """The config's quantizer (of layer ``name``) with the options' explicit ``clip``/``p`` overrides."""
    spec = job.spec if name is None else job.spec_for(name)
    changes = {k: v for k, v in (("clip", options.clip), ("p", options.p)) if v is not None}
    return spec.replace(**changes) if changes else spec


def quantize_weights_rtn(layer: nn.Module, bits: int, spec: QuantizerSpec, name: str) -> None:
    """Round-to-nearest quantization of one layer's weight, stored with :func:`qmodules.set_quantized_weight`."""
    ch = channel_axis(layer)
    w = layer.weight.detach()
    scale, zp = spec_qparams(w, bits, spec, ch_axis=ch, name=name)
    codes = quantize_tensor(w, scale, zp, bits, ch_axis=ch, group_size=spec.group_size)
    qmodules.set_quantized_weight(layer, codes.to(w.device), scale, zp, bits, ch, spec.group_size)


def quantize_asymmetric(model: nn.Module, job: QuantJob, options: AsymmetricOptions) -> MethodResult:
    """Quantize ``model`` in place: weights round-to-nearest, then activation ranges from calibration min/max."""
    result = MethodResult()
    if options.fold_bn:
        result.folded_bn = fold_bn_pairs(model)
    spec = applied_spec(job, options)
    for name, bits in job.bits.items():
        quantize_weights_rtn(submodule(model, name), bits, applied_spec(job, options, name), name)
    if job.act_bits is not None:
        blocks = [u.name for u in build_units(model, job.bits, job.order) if u.kind == "block"]
        inputs, outputs = plan_activations(
            job, options.first_layer_input_bits, options.last_layer_input_bits,
            blocks if options.quantize_block_outputs else [],
        )
        qmodules.attach_activations(model, inputs, outputs)
        assert job.calib_x is not None  # checked by quantize()
        x = job.calib_x if options.num_samples is None else job.calib_x[: options.num_samples]
        p = next(model.parameters(), None)
        observe_activations(model, x, options.batch_size, p.device if p is not None else torch.device("cpu"))
        result.input_act_bits, result.output_act_bits = inputs, outputs
    result.report = {"method": "asymmetric", "clip": spec.clip, "p": spec.p, "layers": len(job.bits)}
    return result
