"""BRECQ: block reconstruction with AdaRound weights and learned activation step sizes.

Pipeline (Li et al., ICLR 2021), with each layer at the bit-width the
``BitConfig`` gives it ("MixQuant + BRECQ"):

1. Fold batch norms into the preceding layers; keep a folded float copy as the reference.
2. Split the model into units (:mod:`.blocks`): residual blocks, and single layers elsewhere.
3. For each unit in execution order: cache its input as produced by the
   network upstream, already quantized, and the float network's output of the
   unit; initialise each layer's scale by the clipping search
   (the clipping search of :mod:`mixquant.core.ranges` at ``p=2.4``); optimise the
   AdaRound variables of all the unit's layers together on
   ``reconstruction loss + rounding_weight * regulariser`` (regulariser off
   for the first ``warmup`` of the iterations, then ``beta`` annealed from
   ``beta_range[0]`` to ``beta_range[1]``), the loss reduced as in BRECQ's
   code (:func:`~.cache.rec_loss`: summed over channels, averaged over samples
   and positions, which is what ``rounding_weight=0.01`` is tuned for); round
   hard, keep round-to-nearest instead when it is better on the calibration
   loss (``never_worse``), and store the weights.
4. With ``act_bits``: attach activation quantizers (every quantized layer's
   input, every block's output), set their ranges by min/max over the
   calibration data, then learn their step sizes unit by unit (:mod:`.lsq`).

Memory: per unit the cache holds ``num_samples`` copies of the unit's input and
output (float32), plus Fisher weights of the output's size with
``loss="fisher"``: ``num_samples x (input + output) x 4`` bytes. With the
defaults (1,024 samples) on 224x224 ImageNet input, a ResNet-18 stage-1 block
needs 1024 x (64x56x56 + 64x56x56) x 4 B ≈ 1.6 GB and the stem convolution,
the largest unit, 1024 x (3x224x224 + 64x112x112) x 4 B ≈ 3.9 GB; on 32x32
CIFAR input a ResNet-20 needs at most 1024 x 2 x 16x32x32 x 4 B = 128 MB. The
largest cache of a run is reported (``peak_cache_bytes``). ``max_cache_mb``
(4096 by default) bounds the cache plus one optimisation step's working set
(measured on the first batch), and is checked before the cache is allocated;
the cache is allocated once and filled in place, and only one unit's cache
exists at a time, so the process's extra peak stays close to the limit.

Across processes and hosts (``distributed=True`` under ``torchrun``): each
rank caches and runs only its block of the samples (about ``num_samples / N``),
so the cache, its limit and ``peak_cache_bytes`` are per rank; every
iteration's gradient is summed over the ranks and the global batch stays
``batch_size`` (:mod:`.data_parallel`).
"""

from __future__ import annotations

import copy
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core.ranges import spec_qparams
from ..nn import qmodules
from ..nn.fold import fold_bn_pairs
from ..nn.layers import channel_axis
from ..parallel import launch
from . import adaround
from .blocks import Unit, build_units
from .cache import (NoData, UnitData, Unsupported, capture_inputs, capture_targets, check_cache_size,
                    fisher_labels, probe_unit)
from .common import MethodResult, QuantJob, check_optional_bits, check_type, observe_activations, plan_activations
from .data_parallel import Shard
from .lsq import learn_step_sizes

__all__ = ["BrecqOptions", "BrecqReport", "UnitRecord", "quantize_brecq"]

LOSSES = ("mse", "fisher")


@dataclass
class BrecqOptions:
    """Options of ``method="brecq"`` (defaults follow BRECQ's ImageNet script).

    Attributes:
        iters: AdaRound iterations per unit. Default 20000.
        batch_size: samples per iteration (and per caching pass). Default 32.
        num_samples: calibration samples used. Default 1024.
        rounding_weight: lambda of the rounding regulariser. Default 0.01.
        lr: Adam learning rate of the rounding variables. Default 1e-3.
        warmup: fraction of iterations without the regulariser. Default 0.2.
        beta_range: (start, end) of the annealed regulariser exponent. Default (20, 2).
        scale_p: norm of the clipping-range search that initialises weight scales. Default 2.4.
        loss: "mse" (squared error of the unit output) or "fisher" (squared error
            weighted by ``(|dL/d out| + fisher_damping)^2``, ``L`` the cross-entropy of the
            float model against the calibration labels, or against its own argmax
            when the data has no labels). Default "mse".
        fisher_damping: added to the absolute gradient before squaring. Default 1.0.
        act_iters: step-size iterations per unit when ``act_bits`` is set. Default 5000.
        act_lr: Adam learning rate of activation step sizes (cosine schedule). Default 4e-4.
        first_layer_input_bits: bits of the model input (first layer's input); None leaves it float. Default 8.
        last_layer_input_bits: bits of the last layer's input; None = ``act_bits``. Default 8.
        quantize_block_outputs: quantize each residual block's output (after the add). Default True.
        device: where reconstruction runs ("cpu", "cuda", "cuda:1", ...); the result stays there. Default "cpu".
        num_threads: torch CPU threads while reconstructing (restored afterwards); None keeps
            the current setting. Small blocks run fastest on 1 thread, especially on a
            shared machine. Default None.
        max_cache_mb: limit on one unit's cache (inputs, targets and Fisher weights, float32),
            checked before it is allocated; ValueError beyond it. Default 4096.
        never_worse: per unit, keep round-to-nearest (weights) or the min/max step sizes
            (activations) when they give a lower calibration loss than the learned ones.
            Default True.
        distributed: under ``torchrun``, split the calibration samples (and so every unit's
            cache and each iteration's forward and backward passes) between the job's ranks,
            which sum their gradients every iteration (:mod:`.data_parallel`); every rank gets
            the same ``calib_data`` and ends with the same model. Outside torchrun it changes
            nothing. Default False.
    """

    iters: int = 20000
    batch_size: int = 32
    num_samples: int = 1024
    rounding_weight: float = 0.01
    lr: float = 1e-3
    warmup: float = 0.2
    beta_range: Tuple[float, float] = (20.0, 2.0)
    scale_p: float = 2.4
    loss: str = "mse"
    fisher_damping: float = 1.0
    act_iters: int = 5000
    act_lr: float = 4e-4
    first_layer_input_bits: Optional[int] = 8
    last_layer_input_bits: Optional[int] = 8
    quantize_block_outputs: bool = True
    device: str = "cpu"
    num_threads: Optional[int] = None
    max_cache_mb: float = 4096.0
    never_worse: bool = True
    distributed: bool = False

    def __post_init__(self) -> None:
        for name in ("iters", "act_iters"):
            check_type(getattr(self, name), int, name)
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "num_samples"):
            check_type(getattr(self, name), int, name)
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rounding_weight", "lr", "scale_p", "fisher_damping", "act_lr", "max_cache_mb", "warmup"):
            check_type(getattr(self, name), (int, float), name)
        for name in ("lr", "scale_p", "act_lr", "max_cache_mb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.rounding_weight < 0 or self.fisher_damping < 0:
            raise ValueError("rounding_weight and fisher_damping must be >= 0")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if (
            not isinstance(self.beta_range, (tuple, list))
            or len(self.beta_range) != 2
            or not all(isinstance(b, (int, float)) and b > 0 for b in self.beta_range)
        ):
            raise ValueError(f"beta_range must be two positive numbers (start, end), got {self.beta_range!r}")
        self.beta_range = (float(self.beta_range[0]), float(self.beta_range[1]))
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("quantize_block_outputs", "never_worse", "distributed"):
            check_type(getattr(self, name), bool, name)
        check_optional_bits(self.first_layer_input_bits, "first_layer_input_bits")
        check_optional_bits(self.last_layer_input_bits, "last_layer_input_bits")
        if self.num_threads is not None:
            check_type(self.num_threads, int, "num_threads")
            if self.num_threads < 1:
                raise ValueError(f"num_threads must be >= 1 or None, got {self.num_threads}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device {self.device!r} is not a torch device: {exc}") from None


@dataclass
class UnitRecord:
    """One unit's reconstruction, as reported.

    Every loss is :func:`~mixquant.methods.cache.rec_loss` (squared error summed
    over channels, averaged over samples and positions; Fisher-weighted with
    ``loss="fisher"``) over all cached samples. Weights phase: ``loss_before``
    is round-to-nearest on the initial (clipping-searched) grid, ``loss_soft``
    the soft rounding at the end of the optimisation, ``loss_rounded`` the
    learned rounding made hard, and ``loss_after`` the rounding kept
    (``kept``: "adaround", or "nearest" when that was better, see
    ``BrecqOptions.never_worse``). Activation phase: ``loss_before`` with the
    min/max step sizes, ``loss_rounded`` with the learned ones, ``kept``
    "learned" or "min/max".
    """

    unit: str
    kind: str
    phase: str
    layers: List[str]
    bits: Dict[str, int]
    loss_before: float
    loss_after: float
    iters: int
    seconds: float
    cache_bytes: int
    hard_fraction: Optional[float] = None
    note: str = ""
    median_iter_s: Optional[float] = None
    loss_soft: Optional[float] = None
    loss_rounded: Optional[float] = None
    kept: str = ""

    @property
    def sec_per_iter(self) -> float:
        return self.seconds / self.iters if self.iters else 0.0


@dataclass
class BrecqReport:
    """Per-unit results of a BRECQ run (``qmodel.mixquant_report``).

    ``world_size`` ranks shared the calibration samples (``distributed=True``),
    this one holding ``samples`` of them; caches and times are this rank's.
    """

    records: List[UnitRecord] = field(default_factory=list)
    peak_cache_bytes: int = 0
    options: Dict[str, object] = field(default_factory=dict)
    seconds: float = 0.0
    world_size: int = 1
    samples: int = 0

    def table(self) -> str:
        """A readable table: unit, phase, bits, losses (BRECQ's reduction, see :class:`UnitRecord`), kept, time, cache."""
        def num(v: Optional[float]) -> str:
            return "-" if v is None else f"{v:.4g}"

        rows = [("unit", "kind", "phase", "bits", "loss before", "soft", "rounded", "loss after", "kept", "ms/iter",
                 "cache MB")]
        for r in self.records:
            bits = ",".join(str(b) for b in r.bits.values())
            rows.append((
                r.unit or "<model>", r.kind, r.phase, bits, num(r.loss_before), num(r.loss_soft), num(r.loss_rounded),
                num(r.loss_after), r.kept or "-",
                f"{(r.median_iter_s if r.median_iter_s is not None else r.sec_per_iter) * 1e3:.2f}",
                f"{r.cache_bytes / 2**20:.1f}",
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"losses: squared error summed over channels, mean over samples and positions; "
                     f"peak cache {self.peak_cache_bytes / 2**20:.1f} MB, total {self.seconds:.1f} s")
        if self.world_size > 1:
            lines.append(f"{self.world_size} ranks: losses over every rank's samples; caches and times of "
                         f"this rank, which held {self.samples} of them")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict:
        return {"records": [asdict(r) for r in self.records], "peak_cache_bytes": self.peak_cache_bytes,
                "options": dict(self.options), "seconds": self.seconds, "world_size": self.world_size,
                "samples": self.samples}


def _init_rounding(layer: nn.Module, bits: int, job: QuantJob, opts: BrecqOptions, name: str) -> adaround.AdaRound:
    ch = channel_axis(layer)
    w = layer.weight.detach()
    # BRECQ's initialisation: the config's grid, range by the clipping search at scale_p.
    spec = job.spec_for(name).replace(clip="mse", p=opts.scale_p)
    scale, zp = spec_qparams(w, bits, spec, ch_axis=ch, name=name)
    return adaround.AdaRound(w, scale.to(w.device), zp.to(w.device), bits, ch, spec.group_size)


def _finish_layer(layer: nn.Module, rounding: adaround.AdaRound, weight: nn.Parameter, mode: str) -> None:
    adaround.detach(layer, weight)
    codes = rounding.codes(mode)
    qmodules.set_quantized_weight(layer, codes, rounding.scale_flat, rounding.zero_point, rounding.bits,
                                  rounding.ch_axis, rounding.group_size)


def _set_mode(roundings: Dict[str, adaround.AdaRound], mode: str) -> None:
    for r in roundings.values():
        r.mode = mode


def reconstruct_unit(
    unit: Unit, data: UnitData, model: nn.Module, job: QuantJob, opts: BrecqOptions,
    generator: torch.Generator, progress: bool, shard: Optional[Shard] = None,
) -> UnitRecord:
    """AdaRound every layer of ``unit`` jointly on the cached data; store the better hard rounding.

    The learned rounding is compared on the whole calibration cache with
    round-to-nearest on the same grid, and (``opts.never_worse``) the lower
    loss is kept, so a unit never ends worse than its initialisation.
    ``shard``: this rank's block of the samples (``data`` holds its cache);
    losses are over every rank's samples. Default: one process, all samples.
    """
    shard = Shard.whole(len(data)) if shard is None else shard
    what = f"reconstructing unit {unit.name or '<model>'}"
    layers = {name: model.get_submodule(name) for name in unit.layers}
    roundings: Dict[str, adaround.AdaRound] = {}
    originals: Dict[str, nn.Parameter] = {}
    try:
        for name, layer in layers.items():
            roundings[name] = _init_rounding(layer, job.bits[name], job, opts, name)
            originals[name] = adaround.attach(layer, roundings[name])
        _set_mode(roundings, "nearest")
        before = shard.eval_loss(unit.module, data, opts.batch_size, f"{what} (loss of round-to-nearest)")
        _set_mode(roundings, "soft")
        seconds, median, soft = 0.0, None, None
        if opts.iters > 0:
            seconds, median = _optimise(unit, data, list(roundings.values()), opts, generator, progress, before,
                                        shard)
            # rank 0's rounding on every rank (the same unless the ranks' kernels round differently)
            shard.from_main_([r.V for r in roundings.values()], f"{what} (sharing the rounding)")
            soft = shard.eval_loss(unit.module, data, opts.batch_size, f"{what} (loss of the soft rounding)")
        _set_mode(roundings, "hard")
        rounded = shard.eval_loss(unit.module, data, opts.batch_size, f"{what} (loss of the hard rounding)")
        numel = sum(r.V.numel() for r in roundings.values())
        hard = sum(r.hard_fraction() * r.V.numel() for r in roundings.values()) / numel
    except BaseException:
        for name, weight in originals.items():  # leave the layers usable (float weights) on error
            adaround.detach(layers[name], weight)
        raise
    kept = "nearest" if opts.never_worse and before < rounded else "adaround"
    for name, layer in layers.items():
        _finish_layer(layer, roundings[name], originals[name], "nearest" if kept == "nearest" else "hard")
    return UnitRecord(unit.name, unit.kind, "weights", list(unit.layers), {n: job.bits[n] for n in unit.layers},
                      before, before if kept == "nearest" else rounded, opts.iters, seconds,
                      data.nbytes, hard, median_iter_s=median, loss_soft=soft, loss_rounded=rounded, kept=kept)


def make_step(
    module: nn.Module, data: UnitData, roundings: List[adaround.AdaRound], opts: BrecqOptions,
    generator: torch.Generator, backend: Optional[str] = None, shard: Optional[Shard] = None,
) -> Tuple[Callable[[int], torch.Tensor], adaround.UnitRounding]:
    """One AdaRound iteration as a function ``step(it) -> reconstruction loss``, and the unit's rounding state.

    A random batch of ``opts.batch_size`` cached samples, the unit's forward
    with soft-rounded weights, the loss's backward pass, then the fused step
    (the regulariser, annealed, enters after the warm-up). Call
    ``state.finish()`` when done. With a ``shard`` of several ranks the batch
    is drawn from all ranks' samples, this rank runs the members it holds, and
    the gradient (with the batch loss) is summed over the ranks before the
    fused step (:mod:`.data_parallel`).
    """
    shard = Shard.whole(len(data)) if shard is None else shard
    state = adaround.UnitRounding(roundings, lr=opts.lr, backend=backend)
    sched = adaround.LinearTempDecay(opts.iters, opts.warmup, *opts.beta_range)
    device = data.x.device
    lam = opts.rounding_weight
    no_loss = torch.zeros((), device=device)

    def step(it: int) -> torch.Tensor:
        idx = torch.randperm(shard.total, generator=generator)[: opts.batch_size].to(device)
        rec = shard.backward_batch(data, module, idx)
        if shard.distributed:
            state.w.grad, rec = shard.summed([state.w.grad, rec], [state.w, no_loss],
                                             f"AdaRound iteration {it} (summing the gradient)")
        warm = sched.in_warmup(it) or lam == 0
        state.step(0.0 if warm else lam, sched(it))
        return rec.detach()

    return step, state


def refresh_every(iters: int) -> int:
    """Iterations between progress-bar updates of the loss: at most 50, at least every 10 % of ``iters``."""
    return max(1, min(50, iters // 10))


def _optimise(
    unit: Unit, data: UnitData, roundings: List[adaround.AdaRound], opts: BrecqOptions,
    generator: torch.Generator, progress: bool, start_loss: float, shard: Shard,
) -> Tuple[float, float]:
    """Run the AdaRound iterations; return (total seconds, median seconds per iteration).

    The bar shows ``rec``, the reconstruction loss (the table's reduction) of
    the soft rounding averaged over the batches since its last update, beside
    ``start``, the table's "loss before" of round-to-nearest.
    """
    step, state = make_step(unit.module, data, roundings, opts, generator, shard=shard)
    bar = tqdm(total=opts.iters, desc=f"{unit.name or '<model>'} ({unit.kind})", disable=not progress, leave=False)
    every = refresh_every(opts.iters)
    start = time.perf_counter()
    times: List[float] = []
    acc, count = 0.0, 0
    try:
        for it in range(opts.iters):
            t_it = time.perf_counter()
            rec = step(it)
            times.append(time.perf_counter() - t_it)
            if progress:
                acc, count = acc + float(rec), count + 1
                if (it + 1) % every == 0 or it == opts.iters - 1:
                    bar.set_postfix(rec=f"{acc / count:.4g}", start=f"{start_loss:.4g}", refresh=False)
                    acc, count = 0.0, 0
            bar.update(1)
    finally:
        bar.close()
        state.finish()
    times.sort()
    return time.perf_counter() - start, times[len(times) // 2]


def _round_to_nearest(unit: Unit, model: nn.Module, job: QuantJob, opts: BrecqOptions, note: str) -> UnitRecord:
    for name in unit.layers:
        layer = model.get_submodule(name)
        rounding = _init_rounding(layer, job.bits[name], job, opts, name)
        qmodules.set_quantized_weight(layer, rounding.codes("nearest"), rounding.scale_flat, rounding.zero_point,
                                      rounding.bits, rounding.ch_axis, rounding.group_size)
    nan = float("nan")
    return UnitRecord(unit.name, unit.kind, "weights", list(unit.layers), {n: job.bits[n] for n in unit.layers},
                      nan, nan, 0, 0.0, 0, None, note)


def _split(unit: Unit, model: nn.Module) -> List[Unit]:
    return [Unit(name, model.get_submodule(name), "layer", [name]) for name in unit.layers]


def _channel_dim(unit: Unit) -> int:
    """The output axis the loss sums over: the last one for a linear layer (``[N, ..., C]``), else 1 (``[N, C, ...]``)."""
    return -1 if isinstance(unit.module, nn.Linear) else 1


def _gather(
    unit: Unit, model: nn.Module, fp_model: nn.Module, x: torch.Tensor, labels: Optional[torch.Tensor],
    opts: BrecqOptions, device: torch.device,
) -> UnitData:
    """The unit's cache; its size is checked against ``max_cache_mb`` before anything is allocated."""
    fp_unit = fp_model.get_submodule(unit.name) if unit.name else fp_model
    shape = probe_unit(fp_model, fp_unit, x, opts.batch_size, device, fisher=labels is not None)
    check_cache_size(shape, x.shape[0], labels is not None, opts.max_cache_mb * 2**20,
                     f"unit {unit.name or '<model>'}")
    inp = capture_inputs(model, unit.module, x, opts.batch_size, device, shape)
    out, wgt = capture_targets(fp_model, fp_unit, x, opts.batch_size, device, shape, labels, opts.fisher_damping)
    return UnitData(inp, out, wgt, _channel_dim(unit))


def quantize_brecq(model: nn.Module, job: QuantJob, opts: BrecqOptions) -> MethodResult:
    """Quantize ``model`` in place with BRECQ (see the module docstring); the report is in ``result.report``."""
    threads = torch.get_num_threads()
    if opts.num_threads is not None:
        torch.set_num_threads(opts.num_threads)
    try:
        return _quantize_brecq(model, job, opts)
    finally:
        torch.set_num_threads(threads)


def _quantize_brecq(model: nn.Module, job: QuantJob, opts: BrecqOptions) -> MethodResult:
    t0 = time.perf_counter()
    device = torch.device(opts.device)
    result = MethodResult()
    result.folded_bn = fold_bn_pairs(model)
    model.to(device)
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(False)
    fp_model = copy.deepcopy(model)  # folded float reference
    assert job.calib_x is not None  # checked by quantize()
    workers = launch.init() if opts.distributed else launch.SINGLE
    shard = Shard.of(workers, min(opts.num_samples, job.calib_x.shape[0]))
    x = shard.take(job.calib_x[: opts.num_samples])  # this rank's block (every sample in a job of one rank)
    y = shard.take(None if job.calib_y is None else job.calib_y[: opts.num_samples])
    progress = job.progress and workers.is_main
    report = BrecqReport(options=asdict(opts), world_size=workers.world_size, samples=len(shard))
    labels = None
    if opts.loss == "fisher":
        labels = shard.settled(lambda: fisher_labels(fp_model, x, y, opts.batch_size, device), "the Fisher labels")
    generator = torch.Generator().manual_seed(job.seed)  # the same draws on every rank
    units: Deque[Unit] = deque(build_units(model, job.bits, job.order))
    done: List[Unit] = []
    try:
        while units:
            unit = units.popleft()
            try:
                data = shard.cached(lambda: _gather(unit, model, fp_model, x, labels, opts, device),
                                    f"caching unit {unit.name or '<model>'}")
            except Unsupported as exc:
                if unit.kind == "block":
                    units.extendleft(reversed(_split(unit, model)))
                    continue
                report.records.append(_round_to_nearest(unit, model, job, opts, f"round to nearest: {exc}"))
            except NoData:
                report.records.append(_round_to_nearest(unit, model, job, opts, "round to nearest: never ran on calib_data"))
            else:
                report.peak_cache_bytes = max(report.peak_cache_bytes, data.nbytes)
                report.records.append(reconstruct_unit(unit, data, model, job, opts, generator, progress, shard))
                done.append(unit)
                del data
            # the next unit's cache runs through this one: the same weights on every rank
            shard.layers_from_main_(model, unit.layers, f"sharing the weights of unit {unit.name or '<model>'}")
        if job.act_bits is not None:
            blocks = [u.name for u in done if u.kind == "block"] if opts.quantize_block_outputs else []
            inputs, outputs = plan_activations(job, opts.first_layer_input_bits, opts.last_layer_input_bits, blocks)
            qmodules.attach_activations(model, inputs, outputs)
            observe_activations(model, x, opts.batch_size, device, shard)
            result.input_act_bits, result.output_act_bits = inputs, outputs
            if opts.act_iters > 0:
                for unit in done:
                    data = shard.settled(lambda: _gather(unit, model, fp_model, x, labels, opts, device),
                                         f"caching unit {unit.name or '<model>'} (activations)")
                    report.peak_cache_bytes = max(report.peak_cache_bytes, data.nbytes)
                    stats = learn_step_sizes(
                        unit.module, data, iters=opts.act_iters, lr=opts.act_lr, batch_size=opts.batch_size,
                        generator=generator, progress=progress, desc=f"{unit.name or '<model>'} (act)",
                        keep_better=opts.never_worse, shard=shard,
                    )
                    report.records.append(UnitRecord(
                        unit.name, unit.kind, "activations", list(unit.layers), {n: job.bits[n] for n in unit.layers},
                        stats["loss_before"], stats["loss_after"], stats["iters"], stats["seconds"], data.nbytes,
                        loss_rounded=stats["loss_learned"], kept=stats["kept"],
                    ))
                    del data
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    report.seconds = time.perf_counter() - t0
    result.report = report
    if progress:
        tqdm.write(report.table(), file=sys.stderr)
    return result
