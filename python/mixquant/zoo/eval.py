"""Tiny evaluation helpers: accuracy, and fidelity of a quantized model to its FP32 reference."""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["evaluate_accuracy", "agreement_and_kl", "predict_logits"]


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256,
                   normalize: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                   ) -> torch.Tensor:
    """Logits of ``model`` (put in eval mode) on ``x``, computed in batches."""
    model.eval()
    outs = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size]
        if normalize is not None:
            xb = normalize(xb)
        outs.append(model(xb))
    return torch.cat(outs)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256,
                      normalize: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on inputs ``x`` with integer labels ``y``.

    ``normalize`` (e.g. :func:`mixquant.zoo.mnist_normalize`) is applied to each batch.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} inputs but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError("empty evaluation set")
    pred = predict_logits(model, x, batch_size, normalize).argmax(1)
    return (pred == y.to(pred.device)).float().mean().item()


@torch.no_grad()
def agreement_and_kl(model_q: nn.Module, model_fp: nn.Module,
                     batches: Iterable[torch.Tensor]) -> Tuple[float, float]:
    """Fidelity of ``model_q`` to the reference ``model_fp`` over already-preprocessed batches.

    Returns ``(top1_agreement, mean_kl)``: the fraction of inputs whose argmax agrees,
    and the mean over inputs of KL(p_fp || p_q) in nats (softmax of the logits).
    ``batches`` may be a single tensor [N,...] or an iterable of tensors.
    """
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    model_q.eval()
    model_fp.eval()
    agree = 0
    kl_sum = 0.0
    n = 0
    for xb in batches:
        lq = model_q(xb).float()
        lp = model_fp(xb).float()
        agree += (lq.argmax(1) == lp.argmax(1)).sum().item()
        logp = F.log_softmax(lp, 1)
        logq = F.log_softmax(lq, 1)
        kl_sum += (logp.exp() * (logp - logq)).sum(1).clamp_min(0).sum().item()
        n += xb.shape[0]
    if n == 0:
        raise ValueError("no inputs given")
    return agree / n, kl_sum / n
