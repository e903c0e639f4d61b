"""Turn user calibration data into one input tensor (and optional labels), checked."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["collect_calib", "eval_mode", "check_forward", "batches"]


def _split_batch(batch: Any, index: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], y
    raise TypeError(
        f"calib_data batch {index} is a {type(batch).__name__}; expected a tensor or an (inputs, labels) tuple"
    )


def _check_finite(x: torch.Tensor, index: int) -> None:
    finite = torch.isfinite(x.detach())
    if not bool(finite.all()):
        bad = (~finite).reshape(x.shape[0], -1).any(1).nonzero()[0, 0].item() if x.dim() > 1 else None
        where = f", the first in sample {bad}" if bad is not None else ""
        raise ValueError(
            f"calib_data batch {index} contains {int((~finite).sum())} non-finite value(s) (NaN or Inf){where}; "
            "calibration data must be finite"
        )


def collect_calib(
    calib_data: Any, num_samples: Optional[int] = None
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gather calibration inputs into one ``[N, ...]`` CPU tensor (and labels ``[N]`` if every batch has them).

    ``calib_data`` is a tensor (a batch of samples along dim 0), a DataLoader,
    or any iterable of batches, where a batch is a tensor or an
    ``(inputs, labels, ...)`` tuple. Iteration stops once ``num_samples``
    samples are gathered (None: all). ValueError for empty data, batches whose
    sample shapes disagree, non-float or non-finite (NaN/Inf) inputs; TypeError for anything else.
    """
    if calib_data is None:
        raise ValueError("calib_data is required here (a DataLoader, a tensor, or an iterable of batches)")
    if isinstance(calib_data, torch.Tensor):
        source: Any = [calib_data]
    elif isinstance(calib_data, (str, bytes)) or not hasattr(calib_data, "__iter__"):
        raise TypeError(f"calib_data must be a DataLoader, a tensor or an iterable of batches, got {type(calib_data).__name__}")
    else:
        source = calib_data
    xs: List[torch.Tensor] = []
    ys: List[Optional[torch.Tensor]] = []
    count = 0
    for i, batch in enumerate(source):
        x, y = _split_batch(batch, i)
        if not x.is_floating_point():
            raise ValueError(f"calib_data batch {i}: inputs must be floating point, got dtype {x.dtype}")
        if x.dim() == 0:
            raise ValueError(f"calib_data batch {i}: inputs must have a batch dimension, got a scalar")
        if xs and x.shape[1:] != xs[0].shape[1:]:
            raise ValueError(
                f"calib_data batch {i}: sample shape {tuple(x.shape[1:])} differs from batch 0's {tuple(xs[0].shape[1:])}"
            )
        if y is not None and y.shape[0] != x.shape[0]:
            raise ValueError(f"calib_data batch {i}: {x.shape[0]} inputs but {y.shape[0]} labels")
        _check_finite(x, i)
        xs.append(x.detach().cpu())
        ys.append(None if y is None else y.detach().cpu())
        count += x.shape[0]
        if num_samples is not None and count >= num_samples:
            break
    if count == 0:
        raise ValueError("calib_data is empty (no samples)")
    x_all = torch.cat(xs)
    y_all = torch.cat(ys) if all(y is not None for y in ys) else None  # type: ignore[arg-type]
    if num_samples is not None:
        x_all = x_all[:num_samples]
        y_all = None if y_all is None else y_all[:num_samples]
    return x_all.contiguous(), y_all


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for a block and restore every module's ``training`` flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def batches(x: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Consecutive slices of ``x`` moved to ``device``."""
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size].to(device)


@torch.no_grad()
def check_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on two samples of ``x`` (eval mode, flags restored); ValueError if it fails."""
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    sample = x[:2].to(device)
    with eval_mode(model):
        try:
            return model(sample)
        except Exception as exc:
            raise ValueError(
                f"calib_data does not fit the model: a forward pass on inputs of shape {tuple(sample.shape)} failed "
                f"({type(exc).__name__}: {exc})"
            ) from exc
