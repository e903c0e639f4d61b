"""``mixquant.search_checkpoint``: the MixQuant search straight from a safetensors checkpoint.

Every tensor of two or more dimensions named ``weight`` or ``*.weight`` is a
layer (the layer name is the tensor name without ``.weight``), unless
``include``/``exclude`` glob patterns on the layer name leave it out. Layers
are read one run of rows at a time (:mod:`mixquant.io.checkpoint`), converted
to float32 run by run (a bfloat16 or float16 checkpoint never exists in
float32 as a whole), and measured with the same kernels as the in-memory
search: rows are independent, so the tables are exactly the ones
:func:`mixquant.search` computes on the loaded model, and so is the config.

With ``distributed=True`` under ``torchrun`` the ranks split the layers
(largest first, each to the least loaded rank), measure their share, and
exchange the per-bit-width figures (float64, exactly); every rank then applies
the rule to the same tables, so the config is the single-process one, on
every rank.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..allocation.rules import DEFAULT_OBJECTIVE
from ..allocation.bitconfig import BitConfig
from ..allocation.tables import pack_totals, totals_size, unpack_totals
from ..core.backend import resolve_backend, resolve_threads
from ..core.error import RoundoffError, join_rows, row_table
from ..core.limits import DEFAULT_CANDIDATES, DEFAULT_P
from ..core.spec import QuantizerSpec
from ..core.tensors import as_matrix, widen_into
from ..io.checkpoint import FLOAT_DTYPES, TensorInfo, list_tensors, read_rows, read_tensor
from ..parallel import comm, launch
from ..parallel.workers import Workers
from ..parallel.shards import assign_by_cost
from .search import GroupSizes, SearchRule, _check_keep, check_rule, decide, layout_options

__all__ = ["search_checkpoint", "checkpoint_layers", "layer_runs", "ROWS_ELEMS"]

# Most weights per run of rows (128 MiB of float32, fewer when no layer is that
# large). Runs this long keep the kernels' per-call costs (thread start-up and
# the barrier at the end, which a busy machine makes expensive) small; a run
# and its bfloat16 source stay under 200 MB.
ROWS_ELEMS = 32 * 2**20


def _layer_name(tensor_name: str) -> Optional[str]:
    if tensor_name == "weight":
        return ""
    return tensor_name[: -len(".weight")] if tensor_name.endswith(".weight") else None


def _matches(name: str, patterns: Optional[Sequence[str]]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def _patterns(value: Optional[Sequence[str]], what: str) -> Optional[List[str]]:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"{what} must be a list of glob patterns (strings)")
    return list(value)


def checkpoint_layers(tensors: Iterable[TensorInfo], include: Optional[Sequence[str]] = None,
                      exclude: Optional[Sequence[str]] = None) -> Dict[str, TensorInfo]:
    """Layer name -> tensor of every 2-D+ weight tensor kept by ``include``/``exclude`` (globs on layer names).

    A weight that is not floating point is an error (a quantized checkpoint
    cannot be searched again): exclude it.
    """
    include, exclude = _patterns(include, "include"), _patterns(exclude, "exclude")
    layers = {}
    for t in tensors:
        name = _layer_name(t.name)
        if name is None or len(t.shape) < 2:
            continue
        if include is not None and not _matches(name, include) or _matches(name, exclude):
            continue
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"tensor {t.name!r} of {t.file!r} is {t.dtype}, not a floating-point weight (is the "
                             f"checkpoint already quantized?); leave it out with exclude=[{name!r}]")
        if 0 in t.shape:
            raise ValueError(f"tensor {t.name!r} of {t.file!r} is empty (shape {list(t.shape)})")
        layers[name] = t
    return layers


def _as_rows(raw: torch.Tensor, buf: torch.Tensor, ch_axis: int, label: str, be: str, nt: int) -> torch.Tensor:
    """``raw`` as the float32 matrix of :func:`as_matrix`; a bfloat16/float16 run is converted into ``buf``,
    reused from run to run (fresh memory for every run would cost a page fault per 4 KiB)."""
    if ch_axis != 0 or raw.dtype not in (torch.bfloat16, torch.float16) or raw.numel() > buf.numel() \
            or not raw.is_contiguous():
        return as_matrix(raw, ch_axis, label)
    return widen_into(raw, buf, be, nt).view(raw.shape[0], -1)


def layer_runs(info: TensorInfo, ch_axis: int, by_rows: bool, buf: torch.Tensor, label: str,
               backend: Optional[str] = None, num_threads: Optional[int] = None) -> Iterator[Tuple[torch.Tensor, int]]:
    """The float32 ``[C, K]`` matrix of a layer run by run (or whole, unless ``by_rows``), with the bytes read.

    Runs of rows keep rows whole and hold at most ``buf.numel()`` weights (one
    row at least); a run is only valid until the next one is read (it may live
    in ``buf``).
    """
    be, nt = resolve_backend(backend), resolve_threads(num_threads)
    row = info.numel // info.shape[0]
    by_rows = by_rows and ch_axis == 0
    step = max(1, buf.numel() // row) if by_rows else info.shape[0]
    for start in range(0, info.shape[0], step):
        stop = min(start + step, info.shape[0])
        raw = read_rows(info, start, stop) if by_rows else read_tensor(info)
        m = _as_rows(raw, buf, ch_axis, label, be, nt)
        del raw
        yield m, (stop - start) * row * (info.nbytes // info.numel)


def _tables(name: str, info: TensorInfo, ch_axis: int, bits: List[int], specs: Mapping[Optional[int], QuantizerSpec],
            be: str, nt: int, bar, buf: torch.Tensor) -> Dict[Optional[int], RoundoffError]:
    """The layer's table under each spec, from runs of rows read one after the other."""
    label = f"weight of layer {name!r}"
    # Rows are independent unless a per-tensor range needs the whole tensor first.
    by_rows = all(s.per_channel for s in specs.values())
    parts: Dict[Optional[int], list] = {gs: [] for gs in specs}
    for m, nbytes in layer_runs(info, ch_axis, by_rows, buf, label, be, nt):
        for gs, spec in specs.items():
            parts[gs].append(row_table(m, bits, spec, be, nt, label))
        if bar is not None:
            bar.update(nbytes)
    # Only the per-bit figures are needed to choose bits: drop the per-row and per-group arrays now
    # (kept for every layer of a large model they would outgrow the runs).
    return {gs: join_rows(parts[gs], bits, spec, info.numel, label).totals() for gs, spec in specs.items()}


@dataclass
class _Plan:
    """A checked search of a checkpoint, before any tensor is read."""

    rule: SearchRule
    spec: QuantizerSpec
    sizes: List[Optional[int]]
    chosen: bool
    layers: Dict[str, TensorInfo]
    axes: Dict[str, int]
    keep: Dict[str, int]
    table_bits: Dict[str, List[int]]
    specs: Dict[Optional[int], QuantizerSpec]

    def decide(self, tables: Mapping[str, Mapping[Optional[int], RoundoffError]]) -> BitConfig:
        return decide({n: t.shape for n, t in self.layers.items()}, self.axes, tables, self.spec, self.rule,
                      self.sizes, self.chosen, self.keep)


def _plan(path, bits, qem, ref_bits, qem_reference, avg_bits, max_bytes, bits_per_weight, objective, per_channel,
          symmetric, clip, p, group_size, keep, include, exclude, transposed) -> _Plan:
    rule = check_rule(bits, qem, ref_bits, qem_reference, avg_bits, max_bytes, bits_per_weight, objective)
    spec = QuantizerSpec(per_channel, symmetric, clip, p)
    sizes, chosen = layout_options(group_size, per_channel, rule)
    layers = checkpoint_layers(list_tensors(path), include, exclude)
    if not layers:
        raise ValueError(f"{str(path)!r} holds no weight tensor (2-D or more, named 'weight' or '*.weight') "
                         "left after include/exclude")
    transposed = _patterns(transposed, "transposed")
    axes = {n: 1 if _matches(n, transposed) else 0 for n in layers}
    keep = _check_keep(keep, list(layers))
    return _Plan(rule, spec, sizes, chosen, layers, axes, keep, rule.table_bits(layers, keep),
                 {gs: spec.replace(group_size=gs) for gs in sizes})


def _measure(plan: _Plan, names: Sequence[str], be: str, nt: int, progress: bool,
             desc: str = "roundoff error") -> Dict[str, Dict[Optional[int], RoundoffError]]:
    """The tables of the layers ``names``, read one after the other."""
    if not names:
        return {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(plan.layers[n].nbytes for n in names), desc=desc, unit="B", unit_scale=True)
    buf = torch.empty(min(ROWS_ELEMS, max(plan.layers[n].numel for n in names)), dtype=torch.float32)
    try:
        tables = {}
        for name in names:
            info = plan.layers[name]
            if bar is not None:
                bar.set_postfix_str(info.name, refresh=False)
            tables[name] = _tables(name, info, plan.axes[name], plan.table_bits[name], plan.specs, be, nt, bar, buf)
    finally:
        if bar is not None:
            bar.close()
    return tables


def _exchange(w: Workers, plan: _Plan, local: Mapping[str, Mapping[Optional[int], RoundoffError]]
              ) -> Dict[str, Dict[Optional[int], RoundoffError]]:
    """Every layer's tables on every rank: each rank writes its layers' figures into one zeroed float64
    vector and the vectors are summed (a figure plus zeros is the figure, exactly)."""
    offsets, at = {}, 0
    for name in plan.layers:
        for gs in plan.sizes:
            offsets[name, gs] = at
            at += totals_size(len(plan.table_bits[name]))
    flat = np.zeros(at, dtype=np.float64)
    for name, by_gs in local.items():
        for gs, table in by_gs.items():
            start = offsets[name, gs]
            pack_totals(table, flat[start: start + totals_size(len(table.bits))])
    summed = comm.all_reduce_(w, torch.from_numpy(flat), "sum", "exchanging the error tables").numpy()
    return {name: {gs: unpack_totals(summed[offsets[name, gs]: offsets[name, gs] + totals_size(len(bits))], bits,
                                     plan.layers[name].numel, plan.specs[gs])
                   for gs in plan.sizes}
            for name, bits in plan.table_bits.items()}


def search_checkpoint(
    path,
    bits: Iterable[int] = DEFAULT_CANDIDATES,
    *,
    qem: Optional[float] = None,
    ref_bits: int = 8,
    qem_reference: str = "layer",
    avg_bits: Optional[float] = None,
    max_bytes: Optional[int] = None,
    bits_per_weight: Optional[float] = None,
    objective: str = DEFAULT_OBJECTIVE,
    per_channel: bool = True,
    symmetric: bool = False,
    clip: str = "minmax",
    p: float = DEFAULT_P,
    group_size: GroupSizes = None,
    keep: Optional[Mapping[str, int]] = None,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    transposed: Optional[Sequence[str]] = None,
    backend: Optional[str] = None,
    num_threads: Optional[int] = None,
    progress: bool = False,
    distributed: bool = False,
) -> BitConfig:
    """The MixQuant search on a safetensors checkpoint (a file or a folder of shards), without the model.

    Rule and quantizer arguments as in :func:`mixquant.search`. Layers are the
    2-D+ tensors named ``weight`` or ``*.weight`` (embeddings included; a tied
    weight stored once is one layer), named without ``.weight``, in natural
    order (``layers.2`` before ``layers.10``); ``include``/``exclude`` are glob
    patterns on those names. ``transposed`` names (globs) the layers whose
    output channels are on axis 1 (GPT-2's ``Conv1D``, ``ConvTranspose*``);
    every other layer has them on axis 0. ``progress`` shows a bar of bytes read.
    Peak memory is about one run of rows (at most :data:`ROWS_ELEMS` weights in
    float32, plus its bfloat16/float16 source) and one layer's tables, except for
    per-tensor quantizers and transposed layers, which read a whole tensor.

    ``distributed=True`` splits the layers between the ranks of a ``torchrun``
    job (:func:`mixquant.parallel.init`; a process started without torchrun is
    a job of one rank): call it on every rank, each needs the checkpoint at
    ``path``. Every rank returns the same config, equal to the single-process
    one; only rank 0 shows progress. An error on one rank (an unreadable shard)
    is raised on all of them; a rank that dies or hangs is a
    :class:`~mixquant.parallel.RankFailure` on the others.
    """
    args = (path, bits, qem, ref_bits, qem_reference, avg_bits, max_bytes, bits_per_weight, objective, per_channel,
            symmetric, clip, p, group_size, keep, include, exclude, transposed)
    w = launch.init() if distributed else launch.SINGLE
    if not w.distributed:
        plan = _plan(*args)
        be, nt = resolve_backend(backend), resolve_threads(num_threads)
        return plan.decide(_measure(plan, list(plan.layers), be, nt, progress))
    plan, local, error = None, {}, None
    try:
        plan = _plan(*args)
        be, nt = resolve_backend(backend), resolve_threads(num_threads)
        names = list(plan.layers)
        owner = assign_by_cost([plan.layers[n].numel for n in names], w.world_size)
        mine = [n for n, r in zip(names, owner) if r == w.rank]
        local = _measure(plan, mine, be, nt, progress and w.is_main, f"roundoff error ({w.label()})")
    except Exception as exc:  # noqa: BLE001 - every rank must learn of it (settle re-raises it here)
        error = exc
    comm.settle(w, error, "the checkpoint search")
    return plan.decide(_exchange(w, plan, local))
