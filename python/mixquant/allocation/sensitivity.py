"""Data-aware sensitivities: each layer's cost at each candidate bit-width, measured with calibration data.

The data-free table (``"weight"``) measures a layer's roundoff error on its
weights alone. The other sensitivities weigh that error by what the network
feels, using calibration batches (:mod:`mixquant.nn.batches`):

``"input"``
    ``sum_ij (w_ij - w^_ij)^2 * m_j`` with ``m_j = E_n[sum_p x_{n,p,j}^2]``, the
    second moment of the input feature weight ``j`` multiplies, summed over the
    positions ``p`` it meets (tokens, or output pixels of a convolution) and
    averaged over samples: the diagonal of the layer's output-error Hessian.
    For a convolution, ``x_j`` is the unfolded patch element (input channel and
    kernel tap), read from the padded input with the layer's stride and
    dilation, so border zeros and strides count exactly (a per-channel moment
    would not see them); for a transposed convolution it is the input channel.
``"output"``
    the output error of every candidate, ``dy_n = (W^_b - W) x_n``, projected on
    each sample's gradient of the task loss at the layer's output and squared:
    ``E_n[(g_n . dy_n)^2]``, the squared first-order change of the loss (the
    measured ``E_n ||dy_n||^2``, layer-local, is there for studies).
``"fisher"``
    ``sum_ij F_ij (w_ij - w^_ij)^2`` with ``F`` the empirical Fisher diagonal of
    the weights: squared per-sample gradients of the task loss (cross-entropy
    against the labels, or the model's own argmax without labels; for outputs
    compared with ``output_loss="cosine"``/``"mse"``, a random Gaussian readout
    of the output, whose squared gradients estimate the Gauss-Newton diagonal).
``"model"``
    end to end: each layer alone quantized at each candidate, the change of the
    model's output on the calibration batches (``output_loss``: KL of the softmax
    over the last dimension, 1 - cosine, relative MSE, or a callable), with the
    part of the network before the layer replayed from a record
    (:mod:`mixquant.nn.replay`).

Layer-local errors are in units of each layer's own output, which later layers
amplify or damp (a residual stream, a LayerNorm, a softmax): summed raw or
divided by each layer's output energy they are not comparable across layers.
``"input"`` (a per-feature statistic) weighs each output channel ``o`` by the
mean squared gradient of the task loss there, ``E[g_o^2]``: to second order the
loss grows by ``1/2 sum_o E[g_o^2] E||dy_o||^2`` if the gradient and the error
are independent across positions. They are not: one weight error repeats at
every token or pixel, and pooling or attention add those copies up, so the
per-position weighting misses the coherent part (measured on MPNet in
docs/RESULTS.md). ``"output"`` keeps it: the dot product ``g_n . dy_n`` sums
over positions before squaring, which equals ``<dL_n/dW, W^_b - W>``, so it is
computed from the per-sample weight gradients of the ``"fisher"`` pass (the
full in-layer quadratic form, where the Fisher diagonal keeps only squares).
``"fisher"``, ``"output"`` and ``"model"`` are in the units of the loss.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.error import RoundoffError, weighted_errors
from ..core.kernels import fake_quantize_tensor
from ..core.limits import DEFAULT_DATA_SENSITIVITY, OUTPUT_LOSSES, SENSITIVITIES
from ..nn.batches import Batch, output_tensor
from ..nn.calib import eval_mode
from ..nn.layers import channel_axis
from ..nn.replay import PrefixReplay, ReplayTooLarge

__all__ = ["SENSITIVITIES", "DATA_SENSITIVITIES", "DEFAULT_DATA_SENSITIVITY", "OUTPUT_LOSSES", "LAYER_SCALINGS",
           "SensitivityResult", "measure_sensitivity"]

DATA_SENSITIVITIES = SENSITIVITIES[1:]
#: How layer-local errors are made comparable across layers: projected on each sample's output
#: gradient ("projected": the default of "output"), weighted per output channel by the mean squared
#: output gradient ("gain": the default of "input", whose statistic is per feature), divided by the
#: layer's own output energy ("energy"), or not at all ("none"); the last three are kept for studies.
LAYER_SCALINGS = ("projected", "gain", "energy", "none")
DEFAULT_SCALING = {"input": "gain", "output": "projected"}
#: Samples per forward pass of the statistics passes.
PASS_BATCH = 32
#: Limit on the outputs recorded to replay the prefix of the network ("model").
REPLAY_MAX_BYTES = 2 * 2**30

OutputLoss = Union[str, Callable[[torch.Tensor, torch.Tensor], Any]]


@dataclass
class SensitivityResult:
    """Costs of every layer at every candidate bit-width, comparable across layers.

    Attributes:
        kind: the sensitivity.
        costs: layer name -> ``[B]`` array, one cost per bit-width of its weight table.
        channel_costs: layer name -> ``[B, C]`` per output channel, where the kind has them.
        seconds: stage -> seconds spent (statistics pass, gradients, tables, replays).
        samples: calibration samples used.
    """

    kind: str
    costs: Dict[str, np.ndarray]
    channel_costs: Dict[str, np.ndarray] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)
    samples: int = 0


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _pass_batches(batches: Sequence[Batch], device: torch.device) -> List[Batch]:
    return [b.to(device) for batch in batches for b in batch.split(PASS_BATCH)]


def _is_conv(layer: nn.Module) -> bool:
    return isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


def _is_conv_transpose(layer: nn.Module) -> bool:
    return isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))


def _out_channel_dim(layer: nn.Module) -> int:
    return 1 if _is_conv(layer) or _is_conv_transpose(layer) else -1


# --------------------------------------------------------------------------
# "input": second moments of the input features
# --------------------------------------------------------------------------


def _conv_tap_moments(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[C_in, taps]``: sum over samples and output positions of each unfolded patch element squared."""
    dims = x.dim() - 2
    k, stride, dil = conv.kernel_size, conv.stride, conv.dilation
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
    elif isinstance(conv.padding, str):
        if conv.padding == "same":
            pads = []
            for i in reversed(range(dims)):
                total = dil[i] * (k[i] - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
    elif any(conv.padding):
        x = F.pad(x, [p for p in reversed(conv.padding) for _ in (0, 1)])
    x2 = x.float().square()
    spatial = x2.shape[2:]
    out = [(spatial[i] - dil[i] * (k[i] - 1) - 1) // stride[i] + 1 for i in range(dims)]
    taps = []
    for t in itertools.product(*(range(ki) for ki in k)):
        idx = tuple(slice(t[i] * dil[i], t[i] * dil[i] + stride[i] * (out[i] - 1) + 1, stride[i]) for i in range(dims))
        taps.append(x2[(slice(None), slice(None)) + idx].sum(dim=[0] + list(range(2, 2 + dims))))
    return torch.stack(taps, dim=1)  # [C_in, taps]


def _input_moments_of(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """This batch's summed input moments, laid out like the layer's [C, K] weight matrix view (or [K])."""
    if _is_conv(layer):
        m = _conv_tap_moments(layer, x)  # [C_in, taps]
        g = layer.groups
        if g == 1:
            return m.reshape(-1)
        cin = m.shape[0] // g
        per_group = m.reshape(g, cin * m.shape[1])  # group gi's rows share its channels' moments
        return per_group.repeat_interleave(layer.out_channels // g, dim=0)  # [C_out, K]
    if _is_conv_transpose(layer):
        taps = math.prod(layer.kernel_size)
        m = x.float().square().sum(dim=[0] + list(range(2, x.dim())))  # [C_in]
        return m.repeat_interleave(taps)  # row elements ordered (c_in, taps) after moving axis 1 first
    k = layer.weight.numel() // layer.weight.shape[channel_axis(layer)]  # columns of the [C, K] view
    if x.shape[-1] != k:
        raise ValueError(f"sensitivity='input' cannot tell how {type(layer).__name__} uses its input "
                         f"(last dimension {x.shape[-1]}, the weight has {k} columns); use 'output', 'fisher' or 'model'")
    return x.float().reshape(-1, k).square().sum(dim=0)


def input_moments(model: nn.Module, layers: Mapping[str, nn.Module], batches: Sequence[Batch]) -> Dict[str, torch.Tensor]:
    """``E_n[sum_p x^2]`` of every layer's input features, from one forward pass with hooks."""
    sums: Dict[str, torch.Tensor] = {}
    count = [0]

    def make(name: str, layer: nn.Module):
        def hook(_m: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                raise ValueError(f"sensitivity='input': layer {name!r} does not take a tensor as its first input")
            m = _input_moments_of(layer, args[0].detach())
            sums[name] = m if name not in sums else sums[name] + m
        return hook

    handles = [layer.register_forward_pre_hook(make(n, layer)) for n, layer in layers.items()]
    try:
        with torch.no_grad(), eval_mode(model):
            for b in batches:
                b.run(model)
                count[0] += b.size
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in sums]
    if missing:
        raise ValueError(f"layer {missing[0]!r} never ran on the calibration data")
    return {n: (s / count[0]).cpu() for n, s in sums.items()}


# --------------------------------------------------------------------------
# "output": measured output error of every candidate
# --------------------------------------------------------------------------


def candidate_weights(layer: nn.Module, table: RoundoffError) -> List[torch.Tensor]:
    """The layer's weight fake-quantized with each quantizer of its table (same order as ``table.bits``)."""
    w = layer.weight.detach()
    ch = channel_axis(layer)
    out = []
    for i, b in enumerate(table.bits):
        fq = fake_quantize_tensor(w, torch.from_numpy(table.scale[i]), torch.from_numpy(table.zero_point[i]),
                                  int(b), ch_axis=ch, group_size=table.group_size)
        out.append(fq.to(device=w.device, dtype=w.dtype))
    return out


class _WeightSwap:
    """Temporarily give ``layer`` another weight tensor (the Parameter object stays)."""

    def __init__(self, layer: nn.Module, value: torch.Tensor) -> None:
        self.layer, self.value = layer, value

    def __enter__(self) -> None:
        self.saved = self.layer.weight.data
        self.layer.weight.data = self.value

    def __exit__(self, *exc: Any) -> None:
        self.layer.weight.data = self.saved


def _channel_sq(d: torch.Tensor, dim: int) -> torch.Tensor:
    d = d.float().movedim(dim, -1)
    return d.reshape(-1, d.shape[-1]).square().sum(dim=0).double()


def output_errors(model: nn.Module, layers: Mapping[str, nn.Module], tables: Mapping[str, RoundoffError],
                  batches: Sequence[Batch]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Per layer ``[B, C_out]`` summed squared output errors of every candidate, and ``[C_out]`` output energy,
    both averaged over samples, from one forward pass (each layer's candidates run on its input there)."""
    errs: Dict[str, torch.Tensor] = {}
    energy: Dict[str, torch.Tensor] = {}
    count = [0]

    def make(name: str, layer: nn.Module):
        dim = _out_channel_dim(layer)

        def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            if not isinstance(out, torch.Tensor):
                raise ValueError(f"sensitivity='output': layer {name!r} does not return one tensor")
            rows = []
            for wq in candidate_weights(layer, tables[name]):
                with _WeightSwap(layer, wq):
                    rows.append(_channel_sq(layer.forward(*args, **kwargs) - out, dim))
            e = torch.stack(rows)
            errs[name] = e if name not in errs else errs[name] + e
            s = _channel_sq(out, dim)
            energy[name] = s if name not in energy else energy[name] + s
        return hook

    handles = [layer.register_forward_hook(make(n, layer), with_kwargs=True) for n, layer in layers.items()]
    try:
        with torch.no_grad(), eval_mode(model):
            for b in batches:
                b.run(model)
                count[0] += b.size
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in errs]
    if missing:
        raise ValueError(f"layer {missing[0]!r} never ran on the calibration data")
    return ({n: (e / count[0]).cpu() for n, e in errs.items()}, {n: (e / count[0]).cpu() for n, e in energy.items()})


# --------------------------------------------------------------------------
# Gradients: the Fisher diagonal of the weights and the output-channel gains
# --------------------------------------------------------------------------


def _task_loss(out: Any, batch: Batch, output_loss: OutputLoss, generator: torch.Generator) -> torch.Tensor:
    y = output_tensor(out)
    if output_loss == "kl":
        logits = y.reshape(-1, y.shape[-1]).float()
        if batch.labels is not None:
            labels = batch.labels.to(logits.device).long().reshape(-1)
            if labels.numel() != logits.shape[0]:
                raise ValueError(f"calibration labels hold {labels.numel()} values for {logits.shape[0]} outputs")
            if (labels < 0).any() or (labels >= logits.shape[1]).any():
                raise ValueError(f"calibration labels must be class indices in [0, {logits.shape[1]})")
        else:
            labels = logits.detach().argmax(dim=1)
        return F.cross_entropy(logits, labels, reduction="sum")
    r = torch.randn(y.shape, generator=generator, dtype=torch.float32).to(y.device)
    return (y.float() * r).sum()


def gradient_stats(model: nn.Module, layers: Mapping[str, nn.Module], batches: Sequence[Batch],
                   output_loss: OutputLoss, *, fisher: bool, gains: bool, seed: int = 0,
                   project: Optional[Mapping[str, RoundoffError]] = None,
                   ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], Dict[str, np.ndarray]]:
    """Per layer: the empirical Fisher diagonal ``E_n[(dL_n/dW)^2]`` (weight-shaped), the gains
    ``E[g_o^2]`` (``[C_out]``, mean over samples and positions of the squared output gradient) and,
    with ``project`` (the layers' tables), ``E_n[<dL_n/dW, W_b - W>^2]`` for every candidate ``b``.

    The last is the squared first-order change of each sample's loss when the
    layer's output moves by ``(W_b - W) x_n``: ``(g_n . dy_n)^2``, the layer's
    output error projected on the output gradient, summed coherently over the
    positions before squaring (the full in-layer quadratic form, where the
    Fisher diagonal keeps only the squares).

    One forward and backward pass per sample (per-sample gradients: the square
    of a batch gradient is not the sum of the squares).
    """
    generator = torch.Generator().manual_seed(seed)
    fisher_sum: Dict[str, torch.Tensor] = {}
    gain_sum: Dict[str, torch.Tensor] = {}
    gain_count: Dict[str, int] = {}
    outputs: Dict[str, List[torch.Tensor]] = {}
    weights = {n: layer.weight for n, layer in layers.items()}
    flags = {id(w): w.requires_grad for w in weights.values()}
    proj_sum: Dict[str, np.ndarray] = {n: np.zeros(len(t.bits)) for n, t in (project or {}).items()}
    need_w = fisher or project is not None
    count = 0

    def make(name: str):
        def hook(_m: nn.Module, _a: tuple, out: Any) -> Any:
            if isinstance(out, torch.Tensor) and out.requires_grad:
                outputs.setdefault(name, []).append(out)
                return out.clone()  # an in-place op downstream (ReLU) must not rewrite the tensor we differentiate
            return None
        return hook

    handles = [layer.register_forward_hook(make(n)) for n, layer in layers.items()] if gains else []
    try:
        for w in weights.values():
            w.requires_grad_(True)
        with eval_mode(model), torch.enable_grad():
            for batch in batches:
                for i in range(batch.size):
                    sample = batch.slice(i, i + 1)
                    outputs.clear()
                    loss = _task_loss(sample.run(model), sample, output_loss, generator)
                    names = list(weights)
                    wanted = [weights[n] for n in names] if need_w else []
                    outs = [(n, o) for n in names for o in outputs.get(n, [])]
                    grads = torch.autograd.grad(loss, wanted + [o for _, o in outs], allow_unused=True)
                    for n, g in zip(names if need_w else [], grads[: len(wanted)]):
                        if g is None:
                            continue
                        g = g.detach().float()
                        if fisher:
                            sq = g.square()
                            fisher_sum[n] = sq if n not in fisher_sum else fisher_sum[n] + sq
                        if project is not None and n in project:
                            w = weights[n].detach().float()
                            for j, wq in enumerate(candidate_weights(layers[n], project[n])):
                                proj_sum[n][j] += float((g * (wq.float() - w)).sum(dtype=torch.float64)) ** 2
                    for (n, o), g in zip(outs, grads[len(wanted):]):
                        if g is None:
                            continue
                        dim = _out_channel_dim(layers[n])
                        sq = _channel_sq(g.detach(), dim)
                        positions = g.numel() // g.shape[dim]
                        gain_sum[n] = sq if n not in gain_sum else gain_sum[n] + sq
                        gain_count[n] = gain_count.get(n, 0) + positions
                    count += 1
    finally:
        for h in handles:
            h.remove()
        for w in weights.values():
            w.requires_grad_(flags[id(w)])
    fisher_out = {n: (fisher_sum.get(n, torch.zeros_like(w, dtype=torch.float32)) / count).cpu()
                  for n, w in weights.items()} if fisher else {}
    gains_out = {}
    if gains:
        for n, layer in layers.items():
            c = layer.weight.shape[channel_axis(layer)]
            gains_out[n] = (gain_sum[n] / gain_count[n]).cpu() if n in gain_sum else torch.zeros(c, dtype=torch.float64)
    return fisher_out, gains_out, {n: v / count for n, v in proj_sum.items()}


# --------------------------------------------------------------------------
# "model": the change of the model's output
# --------------------------------------------------------------------------


class _OutputDistance:
    """Accumulates D(quantized output, float output) over batches; ``value()`` is the mean per sample."""

    def __init__(self, kind: OutputLoss) -> None:
        self.kind, self.num, self.den = kind, 0.0, 0.0

    def add(self, q: torch.Tensor, fp: torch.Tensor, n: int) -> None:
        q, fp = q.float(), fp.float()
        if callable(self.kind):
            v = self.kind(q, fp)
            v = float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
            if not math.isfinite(v):
                raise ValueError(f"output_loss returned {v}; it must be a finite number")
            self.num += v * n
            self.den += n
        elif self.kind == "kl":
            lp, lq = F.log_softmax(fp, dim=-1), F.log_softmax(q, dim=-1)
            kl = (lp.exp() * (lp - lq)).sum(dim=-1).clamp_min(0)
            self.num += float(kl.mean()) * n
            self.den += n
        elif self.kind == "cosine":
            cos = F.cosine_similarity(q.reshape(-1, q.shape[-1]), fp.reshape(-1, fp.shape[-1]), dim=1)
            self.num += float((1 - cos).mean()) * n
            self.den += n
        else:  # relative mse: sums over all batches, then the ratio
            self.num += float((q - fp).double().square().sum())
            self.den += float(fp.double().square().sum())

    def value(self) -> float:
        return self.num / self.den if self.den > 0 else 0.0


def model_costs(model: nn.Module, layers: Mapping[str, nn.Module], tables: Mapping[str, RoundoffError],
                batches: Sequence[Batch], output_loss: OutputLoss, progress: bool = False
                ) -> Tuple[Dict[str, np.ndarray], Dict[str, float]]:
    """Per layer ``[B]``: the mean change of the model's output with only that layer quantized at each candidate."""
    names = list(layers)
    dist = {n: [_OutputDistance(output_loss) for _ in tables[n].bits] for n in names}
    info = {"replay_mb": 0.0, "replayed": 1.0}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches) * sum(len(tables[n].bits) for n in names), desc="model sensitivity",
                   unit="pass")
    with torch.no_grad(), eval_mode(model):
        for batch in batches:
            run = lambda: batch.run(model)  # noqa: E731
            fp = output_tensor(run()).detach()
            try:
                replay: Optional[PrefixReplay] = PrefixReplay(model, run, names, REPLAY_MAX_BYTES)
                info["replay_mb"] = max(info["replay_mb"], replay.nbytes / 2**20)
            except ReplayTooLarge:
                replay, info["replayed"] = None, 0.0
            for name in names:
                layer = layers[name]
                for j, wq in enumerate(candidate_weights(layer, tables[name])):
                    with _WeightSwap(layer, wq):
                        out = replay.replay(name) if replay is not None else run()
                    dist[name][j].add(output_tensor(out), fp, batch.size)
                    if bar is not None:
                        bar.update(1)
            del replay
    if bar is not None:
        bar.close()
    return {n: np.array([d.value() for d in dist[n]]) for n in names}, info


# --------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------


def measure_sensitivity(
    kind: str,
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    tables: Mapping[str, RoundoffError],
    batches: Sequence[Batch],
    *,
    output_loss: OutputLoss = "kl",
    scaling: Optional[str] = None,
    seed: int = 0,
    backend: Optional[str] = None,
    num_threads: Optional[int] = None,
    progress: bool = False,
) -> SensitivityResult:
    """Costs of every layer at the bit-widths of its weight table under sensitivity ``kind``.

    ``tables`` are the layers' weight roundoff-error tables (their quantizers
    are the ones measured); ``batches`` the calibration batches; ``scaling``
    how ``"input"``/``"output"`` errors are made comparable across layers
    (:data:`LAYER_SCALINGS`).
    """
    if kind not in DATA_SENSITIVITIES:
        raise ValueError(f"sensitivity must be one of {DATA_SENSITIVITIES} here, got {kind!r}")
    scaling = DEFAULT_SCALING.get(kind) if scaling is None else scaling
    if kind in DEFAULT_SCALING and scaling not in LAYER_SCALINGS:
        raise ValueError(f"scaling must be one of {LAYER_SCALINGS}, got {scaling!r}")
    if kind == "input" and scaling == "projected":
        raise ValueError("sensitivity='input' is a per-feature statistic: it has no per-sample projection "
                         "(scaling 'gain', 'energy' or 'none')")
    if not callable(output_loss) and output_loss not in OUTPUT_LOSSES:
        raise ValueError(f"output_loss must be one of {OUTPUT_LOSSES} or a callable, got {output_loss!r}")
    device = _device(model)
    passes = _pass_batches(batches, device)
    samples = sum(b.size for b in passes)
    _check_all_run(model, layers, passes[0])
    seconds: Dict[str, float] = {}
    channel: Dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    if kind == "model":
        costs, info = model_costs(model, layers, tables, passes, output_loss, progress)
        seconds["replays"] = time.perf_counter() - t0
        seconds.update({k: v for k, v in info.items()})
        return SensitivityResult(kind, costs, {}, seconds, samples)
    needs_gains = kind in ("input", "output") and scaling == "gain"
    projected = kind == "output" and scaling == "projected"
    fisher: Dict[str, torch.Tensor] = {}
    gains: Dict[str, torch.Tensor] = {}
    if kind == "fisher" or needs_gains or projected:
        fisher, gains, proj = gradient_stats(model, layers, passes, output_loss, fisher=kind == "fisher",
                                             gains=needs_gains, seed=seed, project=tables if projected else None)
        seconds["gradients"] = time.perf_counter() - t0
        if projected:
            return SensitivityResult(kind, proj, {}, seconds, samples)
    t1 = time.perf_counter()
    energy: Dict[str, torch.Tensor] = {}
    if kind == "input":
        moments = input_moments(model, layers, passes)
        seconds["statistics"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        for name, layer in layers.items():
            channel[name] = weighted_errors(layer.weight, moments[name], tables[name], ch_axis=channel_axis(layer),
                                            backend=backend, num_threads=num_threads,
                                            name=f"weight of layer {name!r}")
        if scaling == "energy":
            energy = output_errors(model, layers, {n: _one_bit_table(t) for n, t in tables.items()}, passes)[1]
    elif kind == "output":
        errs, energy = output_errors(model, layers, tables, passes)
        channel = {n: e.numpy() for n, e in errs.items()}
    else:  # fisher
        for name, layer in layers.items():
            channel[name] = weighted_errors(layer.weight, fisher[name], tables[name], ch_axis=channel_axis(layer),
                                            backend=backend, num_threads=num_threads,
                                            name=f"weight of layer {name!r}")
    seconds["tables"] = time.perf_counter() - t1
    costs = {}
    for name, rows in channel.items():
        rows = np.asarray(rows, dtype=np.float64)
        if kind in ("input", "output") and scaling == "gain":
            rows = rows * gains[name].numpy()[None, :]
        costs[name] = rows.sum(axis=1)
        if kind in ("input", "output") and scaling == "energy":
            total = float(energy[name].sum())
            costs[name] = costs[name] / total if total > 0 else costs[name]
        channel[name] = rows
    return SensitivityResult(kind, costs, channel, seconds, samples)


def _check_all_run(model: nn.Module, layers: Mapping[str, nn.Module], batch: Batch) -> None:
    seen = set()
    handles = [layer.register_forward_pre_hook(lambda _m, _a, n=n: seen.add(n)) for n, layer in layers.items()]
    try:
        with torch.no_grad(), eval_mode(model):
            batch.run(model)
    except Exception as exc:
        raise ValueError(f"calib_data does not fit the model: a forward pass failed ({type(exc).__name__}: {exc})") from exc
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in seen]
    if missing:
        raise ValueError(f"layer {missing[0]!r} never runs on the calibration data ({len(missing)} such layers): "
                         "a data-aware sensitivity cannot measure it; leave it out (filter_fn) or pin it (keep)")


def _one_bit_table(t: RoundoffError) -> RoundoffError:
    """The table's first quantizer only (the output energy pass needs one candidate, not all)."""
    import dataclasses

    return dataclasses.replace(t, bits=t.bits[:1], scale=t.scale[:1], zero_point=t.zero_point[:1])
