"""Learned activation step sizes (LSQ style), one reconstruction unit at a time.

The weights are already final. Every :class:`~mixquant.nn.qmodules.ActQuantizer`
inside the unit (the input quantizers of its layers and, for a block, the
quantizer after the residual add) learns its scale by minimising the unit's
reconstruction loss, with straight-through rounding, Adam and a cosine
learning-rate schedule (BRECQ: lr 4e-4, 5,000 iterations). Zero points stay
where the min/max calibration put them.
"""

from __future__ import annotations

import time
from typing import List, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..nn import qmodules
from .cache import UnitData
from .data_parallel import Shard

__all__ = ["learn_step_sizes"]

MIN_SCALE = 1e-8


def learn_step_sizes(
    unit: nn.Module,
    data: UnitData,
    *,
    iters: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    progress: bool = False,
    desc: str = "",
    keep_better: bool = True,
    shard: Optional[Shard] = None,
) -> dict:
    """Optimise the scales of the activation quantizers in ``unit``; return losses and timing.

    The loss is :func:`~mixquant.methods.cache.rec_loss` (BRECQ's reduction).
    With ``keep_better`` the initial (min/max) scales are restored when they
    give a lower loss over all cached samples than the learned ones.

    Returns a dict with ``loss_before`` (initial scales), ``loss_learned``,
    ``loss_after`` (the scales kept), ``kept`` ("learned" or "min/max"),
    ``iters``, ``seconds`` and ``quantizers`` (how many scales were learned).

    ``shard``: this rank's block of the samples in a job of several ranks
    (``data`` holds its cache): every rank draws the same global batch, runs
    the members it holds, and the scales' gradients are summed over the ranks
    before Adam's step; losses are over every rank's samples (see
    :mod:`.data_parallel`). Default: one process, all samples.
    """
    shard = Shard.whole(len(data)) if shard is None else shard
    quantizers: List[qmodules.ActQuantizer] = [q for _, q in qmodules.act_quantizers(unit)]
    before = shard.eval_loss(unit, data, batch_size, f"{desc}: loss of the min/max step sizes")
    if not quantizers or iters <= 0:
        return {"loss_before": before, "loss_learned": before, "loss_after": before, "kept": "min/max", "iters": 0,
                "seconds": 0.0, "quantizers": len(quantizers)}
    params = [q.scale for q in quantizers]
    initial = [p.detach().clone() for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    no_loss = torch.zeros((), device=data.x.device)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=0.0)
    bar = tqdm(total=iters, desc=desc, disable=not progress, leave=False)
    every = max(1, min(50, iters // 10))  # at least every 10 % of the unit
    start = time.perf_counter()
    acc, count = 0.0, 0
    try:
        for it in range(iters):
            idx = torch.randperm(shard.total, generator=generator)[:batch_size].to(data.x.device)
            opt.zero_grad(set_to_none=True)
            loss = shard.backward_batch(data, unit, idx)
            if shard.distributed:
                *grads, loss = shard.summed([p.grad for p in params] + [loss], params + [no_loss],
                                            f"{desc}: step-size iteration {it} (summing the gradient)")
                for p, g in zip(params, grads):
                    p.grad = g
            opt.step()
            sched.step()
            with torch.no_grad():
                for p in params:
                    p.clamp_(min=MIN_SCALE)
            if progress:
                acc, count = acc + float(loss.detach()), count + 1
                if (it + 1) % every == 0 or it == iters - 1:
                    bar.set_postfix(rec=f"{acc / count:.4g}", start=f"{before:.4g}", refresh=False)
                    acc, count = 0.0, 0
            bar.update(1)
    finally:
        bar.close()
        for p in params:
            p.requires_grad_(False)
    seconds = time.perf_counter() - start
    # rank 0's step sizes on every rank (the same unless the ranks' kernels round differently)
    shard.from_main_(params, f"{desc}: sharing the step sizes")
    learned = shard.eval_loss(unit, data, batch_size, f"{desc}: loss of the learned step sizes")
    kept = "learned"
    if keep_better and before < learned:
        with torch.no_grad():
            for p, p0 in zip(params, initial):
                p.copy_(p0)
        kept = "min/max"
    return {"loss_before": before, "loss_learned": learned, "loss_after": learned if kept == "learned" else before,
            "kept": kept, "iters": iters, "seconds": seconds, "quantizers": len(quantizers)}
