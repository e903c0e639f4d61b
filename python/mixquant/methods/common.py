"""What every quantization method shares: the job description, option helpers, activation planning."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple, Type, TypeVar

import torch
import torch.nn as nn

from ..core.limits import MAX_ACT_BITS, MIN_ACT_BITS
from ..core.spec import QuantizerSpec
from ..nn import qmodules
from ..nn.calib import batches
from ..nn.order import execution_order  # noqa: F401 - re-exported for the methods

if TYPE_CHECKING:  # for the annotation only: data_parallel sits above this module
    from .data_parallel import Shard

__all__ = ["QuantJob", "MethodResult", "build_options", "check_optional_bits", "execution_order", "plan_activations",
           "observe_activations"]

T = TypeVar("T")


@dataclass
class QuantJob:
    """Everything a method needs besides its own options (built and validated by :func:`mixquant.quantize`).

    Attributes:
        bits: layer fqn → weight bits, exactly the config's.
        spec: the weight quantizer of the config (granularity, symmetry, range rule and its
            norm), applied unless a method option overrides a field explicitly.
        act_bits: activation bits, or None for weight-only quantization.
        order: quantized layer names in execution order (first = model input layer, last = output layer).
        calib_x, calib_y: calibration inputs ``[N, ...]`` (CPU) and labels ``[N]`` or None.
        seed: seed of every random draw.
        progress: show progress bars.
        group_sizes: layer fqn → its group size where it differs from ``spec`` (the
            budget rule chose the layout per layer); see :meth:`spec_for`.
    """

    bits: Dict[str, int]
    spec: QuantizerSpec
    act_bits: Optional[int]
    order: List[str]
    calib_x: Optional[torch.Tensor]
    calib_y: Optional[torch.Tensor]
    seed: int = 0
    progress: bool = True
    group_sizes: Dict[str, Optional[int]] = field(default_factory=dict)

    def spec_for(self, name: str) -> QuantizerSpec:
        """The weight quantizer of layer ``name``: :attr:`spec` with the layer's own group size."""
        if name in self.group_sizes and self.group_sizes[name] != self.spec.group_size:
            return self.spec.replace(group_size=self.group_sizes[name])
        return self.spec


@dataclass
class MethodResult:
    """What a method did to the model, recorded so that export/load can rebuild it."""

    folded_bn: List[Tuple[str, str]] = field(default_factory=list)
    input_act_bits: Dict[str, int] = field(default_factory=dict)
    output_act_bits: Dict[str, int] = field(default_factory=dict)
    report: Any = None


def check_optional_bits(value: Any, name: str) -> None:
    """ValueError/TypeError unless ``value`` is None or an activation bit-width."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int in {MIN_ACT_BITS}..{MAX_ACT_BITS} or None, "
                        f"got {type(value).__name__}")
    if not MIN_ACT_BITS <= value <= MAX_ACT_BITS:
        raise ValueError(f"{name} must be in {MIN_ACT_BITS}..{MAX_ACT_BITS}, got {value}")


def check_type(value: Any, types: Any, name: str) -> None:
    """TypeError naming ``name`` unless ``value`` is an instance of ``types`` (bools are not numbers)."""
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise TypeError(f"{name} must be {getattr(types, '__name__', types)}, got bool")
    if not isinstance(value, types):
        raise TypeError(f"{name} must be {getattr(types, '__name__', types)}, got {type(value).__name__}")


# Options that no longer exist, with what replaced them. Passing the value that
# is now the only behaviour (False: "do not change the config's bits") is accepted.
REMOVED_OPTIONS = {
    "keep_first_last_8bit": (
        False,
        "a method applies every layer's configured bits as they are; pin the first and last layer in the "
        "config instead: mixquant.search(model, ..., keep=mixquant.keep_first_last(model, example_input)) "
        "(or mixquant.uniform(..., keep=...); on the command line, search --keep-first-last 8)",
    ),
}


def _drop_removed(overrides: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(overrides)
    for key, (harmless, replacement) in REMOVED_OPTIONS.items():
        if key in out:
            value = out.pop(key)
            if value is not harmless:
                raise ValueError(f"option {key}={value!r} was removed: {replacement}")
    return out


def build_options(cls: Type[T], options: Optional[T], overrides: Mapping[str, Any]) -> T:
    """An options instance: ``options`` (or the defaults) with ``overrides`` applied and validated.

    TypeError naming the first unknown option.
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    overrides = _drop_removed(overrides)
    for key in overrides:
        if key not in names:
            raise TypeError(
                f"unknown option {key!r} for {cls.__name__}; valid options: {', '.join(sorted(names))}"
            )
    if options is None:
        return cls(**overrides)
    if not isinstance(options, cls):
        raise TypeError(f"options must be a {cls.__name__}, got {type(options).__name__}")
    return dataclasses.replace(options, **overrides)  # re-runs __post_init__ validation


def plan_activations(
    job: QuantJob,
    first_layer_input_bits: Optional[int],
    last_layer_input_bits: Optional[int],
    block_names: List[str],
) -> Tuple[Dict[str, int], Dict[str, int]]:
    """Which layer inputs and module outputs get activation quantizers, at which bits.

    Every quantized layer's input gets ``job.act_bits``, except the first layer
    (``first_layer_input_bits``; None leaves the model input in float) and the
    last layer (``last_layer_input_bits``; None means ``act_bits``). Each name in
    ``block_names`` gets an output quantizer at ``act_bits``.
    """
    if job.act_bits is None:
        return {}, {}
    inputs = {name: job.act_bits for name in job.bits}
    if job.order:
        first, last = job.order[0], job.order[-1]
        if last_layer_input_bits is not None:
            inputs[last] = last_layer_input_bits
        if first_layer_input_bits is None:
            inputs.pop(first, None)
        else:
            inputs[first] = first_layer_input_bits
    outputs = {name: job.act_bits for name in block_names}
    return inputs, outputs


@torch.no_grad()
def observe_activations(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device,
                        shard: Optional["Shard"] = None) -> None:
    """Record min/max of every activation quantizer over ``x``, then set their scales (min/max rule).

    ValueError naming the quantized layer (or block) and the samples when an
    activation holds NaN or Inf, which would otherwise give a NaN or default scale.
    With the ``shard`` of a job of several ranks, ``x`` is this rank's block
    of the samples: the ranges are the minimum and maximum over every rank's,
    and an error on one rank is raised on all.
    """
    first = 0 if shard is None else shard.start

    def observe() -> None:
        for i, xb in enumerate(batches(x, batch_size, device)):
            model(xb)
            bad = [name for name, q in qmodules.act_quantizers(model) if q.saw_nonfinite]
            if bad:
                owner, _, kind = bad[0].rpartition(".")
                where = "input of layer" if kind == qmodules.INPUT_QUANTIZER else "output of"
                lo = first + i * batch_size
                raise ValueError(
                    f"calibration samples {lo}..{lo + xb.shape[0] - 1} give non-finite "
                    f"activations (NaN or Inf) at the {where} {owner!r}"
                    + (f" and {len(bad) - 1} more quantizer(s)" if len(bad) > 1 else "")
                    + "; activation ranges cannot be set from them"
                )

    qmodules.set_act_mode(model, "observe")
    if shard is None:
        observe()
    else:
        shard.settled(observe, "observing the activation ranges")
        quantizers = [q for _, q in qmodules.act_quantizers(model)]
        shard.min_max_([q.min_val for q in quantizers], [q.max_val for q in quantizers],
                       "sharing the activation ranges")
    for _, q in qmodules.act_quantizers(model):
        if not torch.isfinite(q.min_val):  # never ran on the calibration data: range [0, 0]
            q.min_val.zero_()
            q.max_val.zero_()
        q.init_from_range()
    qmodules.set_act_mode(model, "quant")
