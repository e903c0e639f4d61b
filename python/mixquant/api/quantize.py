"""``mixquant.quantize``: apply a :class:`~mixquant.BitConfig` to a model with a quantization method.

The result is *simulated* quantization: an ordinary ``nn.Module`` whose
quantized layers hold dequantized weights (exactly on their grids) and, with
``act_bits``, fake-quantize activations; see :mod:`mixquant.nn.qmodules` for what
is attached to each layer. What was done is recorded on the result:

* ``qmodel.mixquant_state`` (:class:`QuantState`): per-layer bits, quantizer
  settings, activation quantizers, folded batch norms: what
  :func:`mixquant.export` needs;
* ``qmodel.mixquant_report``: the method's report (for BRECQ a
  :class:`~mixquant.methods.BrecqReport`: each unit's loss before and after);
* :func:`quant_info` ``(qmodel)``: per-layer bits, average bits, packed size.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch.nn as nn

from ..allocation.bitconfig import BitConfig, layer_bytes, param_groups
from ..core.limits import MAX_ACT_BITS, MAX_BITS, MIN_ACT_BITS, MIN_BITS
from ..methods import METHODS, AsymmetricOptions, BrecqOptions
from ..methods.common import QuantJob, build_options
from ..nn import qmodules
from ..nn.calib import check_forward, collect_calib
from ..nn.layers import channel_axis, is_scripted, submodule, tied_weights
from ..nn.order import execution_order
from ..nn.parametrized import materialize_weights
from ..nn.precision import LOW_PRECISION, max_bits_for, restore_dtypes, to_float32

__all__ = ["quantize", "quant_info", "QuantInfo", "QuantState"]

Options = Union[AsymmetricOptions, BrecqOptions]


@dataclass
class QuantState:
    """What :func:`quantize` did to a model (stored as ``qmodel.mixquant_state``).

    Attributes:
        method: "asymmetric" or "brecq".
        config: the applied :class:`BitConfig` (the caller's, with the granularity actually used).
        requested_bits: the bits of the config the caller passed (the same as ``config.bits``).
        per_channel, symmetric: weight quantizer settings.
        act_bits: the ``act_bits`` argument (None: weights only).
        input_act_bits: layer fqn → bits of its input quantizer.
        output_act_bits: module fqn → bits of its output quantizer (residual blocks).
        folded_bn: ``(layer fqn, bn fqn)`` pairs folded (each BN is now ``nn.Identity``).
        options: the method options, as a dict.
    """

    method: str
    config: BitConfig
    requested_bits: Dict[str, int]
    per_channel: bool
    symmetric: bool
    act_bits: Optional[int]
    input_act_bits: Dict[str, int] = field(default_factory=dict)
    output_act_bits: Dict[str, int] = field(default_factory=dict)
    folded_bn: List[Tuple[str, str]] = field(default_factory=list)
    options: Dict[str, Any] = field(default_factory=dict)

    @property
    def bits(self) -> Dict[str, int]:
        return dict(self.config.bits)


@dataclass
class QuantInfo:
    """Size and bit-widths of a quantized model (see :func:`quant_info`).

    ``size_bytes = packed_weight_bytes + qparam_bytes``, the same definition as
    :attr:`BitConfig.size_bytes` (codes packed at each layer's bits, rounded up
    to whole bytes per layer, plus a float32 scale and an int32 zero point per
    channel or per tensor, or a bfloat16 scale and a packed zero point per
    group). ``float_bytes`` counts everything else a file must hold: biases,
    batch norms not folded, unquantized layers, activation scales. A tied
    weight is counted once.
    """

    method: str
    bits: Dict[str, int]
    num_params: Dict[str, int]
    avg_bits: float
    packed_weight_bytes: int
    qparam_bytes: int
    size_bytes: int
    float_bytes: int
    input_act_bits: Dict[str, int]
    output_act_bits: Dict[str, int]

    def table(self) -> str:
        """Per-layer bits and a summary line."""
        rows = [("layer", "params", "bits", "act in")]
        for name, b in self.bits.items():
            act = self.input_act_bits.get(name)
            rows.append((name or "<model>", str(self.num_params[name]), str(b), "-" if act is None else str(act)))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"{self.method}: {len(self.bits)} layers, average {self.avg_bits:.3f} bits, {self.size_bytes} bytes "
            f"({self.packed_weight_bytes} packed weights + {self.qparam_bytes} scales/zero points), "
            f"{self.float_bytes} bytes of other float tensors"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _state(qmodel: nn.Module) -> QuantState:
    state = getattr(qmodel, "mixquant_state", None)
    if not isinstance(state, QuantState):
        raise ValueError("the model is not quantized by mixquant (no mixquant_state); call mixquant.quantize first")
    return state


def quantized_keys(state: QuantState) -> List[str]:
    """state_dict keys that hold quantized weights and their parameters."""
    keys = []
    for name in state.config.bits:
        prefix = f"{name}." if name else ""
        keys += [prefix + "weight", prefix + "weight_scale", prefix + "weight_zero_point"]
        keys += [f"{alias}.weight" if alias else "weight" for alias in state.config.tied.get(name, [])]
    return keys


def quant_info(qmodel: nn.Module) -> QuantInfo:
    """Per-layer bits, parameter-weighted average bits and packed size of a quantized model.

    Raises ValueError for a model :func:`quantize` did not produce.
    """
    state = _state(qmodel)
    num_params: Dict[str, int] = {}
    packed = qparams = 0
    for name, bits in state.config.bits.items():
        layer = submodule(qmodel, name)
        n = layer.weight.numel()
        groups = layer.weight_scale.numel()
        num_params[name] = n
        total = layer_bytes(n, bits, groups, getattr(layer, "mixquant_group_size", None) is not None)
        packed += (n * bits + 7) // 8
        qparams += total - (n * bits + 7) // 8
    skip = set(quantized_keys(state))
    float_bytes = sum(t.numel() * t.element_size() for k, t in qmodel.state_dict().items() if k not in skip)
    total_n = sum(num_params.values())
    avg = sum(num_params[k] * b for k, b in state.config.bits.items()) / total_n if total_n else 0.0
    return QuantInfo(state.method, dict(state.config.bits), num_params, avg, packed, qparams, packed + qparams,
                     float_bytes, dict(state.input_act_bits), dict(state.output_act_bits))


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _already_quantized(model: nn.Module) -> bool:
    return hasattr(model, "mixquant_state") or any(qmodules.is_quantized_layer(m) for m in model.modules())


def _check_scripted(method: str, act_bits: Optional[int], opts: Any) -> None:
    """A TorchScript model's parameters can be replaced, its modules and hooks cannot: weights only, no BRECQ."""
    refused = (f"method={method!r}" if method != "asymmetric" else
               f"act_bits={act_bits}" if act_bits is not None else
               "fold_bn=True" if getattr(opts, "fold_bn", False) else None)
    if refused:
        raise ValueError(f"a TorchScript model supports weight-only asymmetric quantization, not {refused}; "
                         "load the model as an nn.Module (package.module:factory) for that")


def _applied_config(config: BitConfig, model: nn.Module, bits: Dict[str, int], per_channel: bool, symmetric: bool) -> BitConfig:
    """The config as applied, with every tie the model really has; what differs from ``config`` is recorded in its rule.

    With another granularity or symmetry, ``rule["quantizer_changed"]`` is set and the error
    tables (measured with the other quantizer) are dropped.
    """
    grouped = [n for n in bits if config.group_size_of(n) is not None]
    if grouped and not per_channel:
        raise ValueError(f"per_channel=False contradicts the config: layer {grouped[0]!r} has groups of "
                         f"{config.group_size_of(grouped[0])} (groups split output channels)")
    groups = dict(config.groups)
    if per_channel != config.per_channel:
        for name in bits:
            layer = submodule(model, name)
            groups[name] = param_groups(tuple(layer.weight.shape), channel_axis(layer), per_channel, None)
    rule, errors = dict(config.rule), config.errors
    if (per_channel, symmetric) != (config.per_channel, config.symmetric):
        rule["quantizer_changed"] = True
        errors = {}
    return dataclasses.replace(config, bits=dict(bits), groups=groups, per_channel=per_channel, symmetric=symmetric,
                               rule=rule, errors=errors, tied=tied_weights(model, bits))


def _check_copyable(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if any(type(hook).__name__ == "WeightNorm" for hook in module._forward_pre_hooks.values()):
            raise ValueError(
                f"layer {name!r} uses the deprecated hook-based torch.nn.utils.weight_norm, whose weight torch "
                "cannot copy; use torch.nn.utils.parametrizations.weight_norm (supported), or call "
                "torch.nn.utils.remove_weight_norm on it first"
            )


def _check_has_data(model: nn.Module) -> None:
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_meta:
            raise ValueError(f"the model has tensors on the meta device, without data ({name!r} is one); "
                             "materialise it first (model.to_empty(device='cpu'), then load its weights)")


def _check_dtype_holds_bits(model: nn.Module, bits: Dict[str, int], dtypes: Dict[str, Any]) -> None:
    for name, b in bits.items():
        dtype = dtypes.get(f"{name}.weight" if name else "weight")
        if dtype is not None and b > max_bits_for(dtype):
            raise ValueError(
                f"layer {name!r}: a {str(dtype).replace('torch.', '')} weight cannot carry {b}-bit codes exactly "
                f"(at most {max_bits_for(dtype)} bits); quantize a float32 copy (model.float()) instead"
            )


def _check_stored_grids(model: nn.Module, names: List[str], dtypes: Dict[str, Any]) -> None:
    for name in names:
        layer = submodule(model, name)
        if layer.weight.dtype in LOW_PRECISION and qmodules.grid_codes(layer) is None:
            raise ValueError(
                f"layer {name!r}: its {str(layer.weight.dtype).replace('torch.', '')} weight cannot hold its "
                f"{layer.mixquant_bits}-bit grid exactly (a range too narrow for the dtype); quantize a float32 "
                "copy (model.float()) instead"
            )


def quantize(
    model: nn.Module,
    config: BitConfig,
    method: str = "asymmetric",
    *,
    calib_data: Any = None,
    act_bits: Optional[int] = None,
    per_channel: Optional[bool] = None,
    symmetric: Optional[bool] = None,
    seed: int = 0,
    progress: bool = True,
    inplace: bool = False,
    options: Optional[Options] = None,
    **method_options: Any,
) -> nn.Module:
    """Quantize ``model`` with per-layer weight bits from ``config``; return the quantized model.

    Args:
        model: a float model. It is not modified unless ``inplace``.
        config: a :class:`BitConfig` (from :func:`mixquant.search` or :func:`mixquant.uniform`)
            that fits ``model``; every configured layer gets exactly its bits. To keep
            the first and last layer at 8 bits, pin them in the config
            (``keep=mixquant.keep_first_last(model, example_input)`` in :func:`mixquant.search`).
        method: "asymmetric" (vanilla round-to-nearest, :class:`AsymmetricOptions`)
            or "brecq" (:class:`BrecqOptions`).
        calib_data: a DataLoader, a tensor ``[N, ...]``, or an iterable of batches
            (tensors or ``(inputs, labels)`` tuples). Required by "brecq" and by ``act_bits``.
        act_bits: activation bits (``MIN_ACT_BITS..MAX_ACT_BITS``, 2..16), or None to quantize weights only.
        per_channel, symmetric: weight quantizer; None takes the config's.
        seed: seed of all random draws (BRECQ's batch sampling). Results are
            deterministic for a seed on one machine.
        progress: show progress bars (BRECQ: one per unit, with the current loss).
        inplace: quantize ``model`` itself. The work is still done on a copy,
            which replaces the model's contents only on success, so a failure
            leaves ``model`` untouched.
        options: a prebuilt options object of the method.
        **method_options: fields of the method's options (overriding ``options``);
            an unknown name raises TypeError.

    Returns:
        The quantized model, in eval mode (on ``BrecqOptions.device`` for BRECQ).

    Raises:
        TypeError: wrong argument types, unknown options.
        ValueError: a config that does not fit ``model``, bad ``act_bits``,
            missing/empty/ill-shaped calibration data, an already-quantized model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, BitConfig):
        raise TypeError(f"config must be a mixquant.BitConfig, got {type(config).__name__}")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    options_cls, run = METHODS[method]
    opts = build_options(options_cls, options, method_options)
    if act_bits is not None and (isinstance(act_bits, bool) or not isinstance(act_bits, int)):
        raise TypeError(f"act_bits must be an int in {MIN_ACT_BITS}..{MAX_ACT_BITS} or None, "
                        f"got {type(act_bits).__name__}")
    if act_bits is not None and not MIN_ACT_BITS <= act_bits <= MAX_ACT_BITS:
        raise ValueError(f"act_bits must be in {MIN_ACT_BITS}..{MAX_ACT_BITS}, got {act_bits}")
    per_channel = config.per_channel if per_channel is None else _check_bool(per_channel, "per_channel")
    symmetric = config.symmetric if symmetric is None else _check_bool(symmetric, "symmetric")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    _check_bool(progress, "progress")
    _check_bool(inplace, "inplace")
    if _already_quantized(model):
        raise ValueError("the model is already quantized; quantize a float model")
    _check_has_data(model)
    if is_scripted(model):
        _check_scripted(method, act_bits, opts)
    else:
        _check_copyable(model)
    config.check_model(model)
    for name, bits in config.bits.items():
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"layer {name!r}: quantize supports {MIN_BITS}..{MAX_BITS} weight bits, "
                             f"the config has {bits}")

    needs_data = method == "brecq" or act_bits is not None
    if calib_data is None and needs_data:
        why = "method='brecq'" if method == "brecq" else f"act_bits={act_bits}"
        raise ValueError(f"{why} needs calib_data (a DataLoader, a tensor or an iterable of batches)")
    x = y = None
    if calib_data is not None:
        x, y = collect_calib(calib_data, getattr(opts, "num_samples", None))

    # The work happens on a copy in float32, with plain (materialised) weights.
    qmodel = copy.deepcopy(model)
    qmodel.eval()
    materialize_weights(qmodel, config.bits)
    dtypes = to_float32(qmodel)
    if x is not None:
        x = x.float() if x.dtype in LOW_PRECISION else x
        check_forward(qmodel, x)
    order = execution_order(qmodel, list(config.bits), None if x is None else x[:2])

    bits = dict(config.bits)
    _check_dtype_holds_bits(qmodel, bits, dtypes)
    applied = _applied_config(config, model, bits, per_channel, symmetric)
    job = QuantJob(bits=bits, spec=applied.spec, act_bits=act_bits, order=order, calib_x=x, calib_y=y, seed=seed,
                   progress=progress, group_sizes=dict(applied.layer_group_size))

    result = run(qmodel, job, opts)
    restore_dtypes(qmodel, dtypes)
    _check_stored_grids(qmodel, list(bits), dtypes)
    qmodel.eval()
    qmodel.mixquant_state = QuantState(
        method=method, config=applied, requested_bits=dict(config.bits), per_channel=per_channel,
        symmetric=symmetric, act_bits=act_bits, input_act_bits=dict(result.input_act_bits),
        output_act_bits=dict(result.output_act_bits), folded_bn=list(result.folded_bn),
        options=dataclasses.asdict(opts),
    )
    qmodel.mixquant_report = result.report
    if inplace:
        model.__dict__.clear()
        model.__dict__.update(qmodel.__dict__)
        model.__class__ = qmodel.__class__  # a parametrized model's class is rolled back too
        return model
    return qmodel
