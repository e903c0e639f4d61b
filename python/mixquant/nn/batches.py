"""Calibration batches of any model: positional inputs, keyword inputs and labels.

The data-aware search runs the user's model on calibration data, and models
take their inputs in many forms. A batch from ``calib_data`` is read as:

* a tensor: one positional input, samples along dim 0;
* a dict: keyword inputs (as Hugging Face models take ``input_ids`` /
  ``attention_mask``); a ``"labels"`` entry is taken as the labels;
* a tuple or list: ``(inputs, labels)`` when it has two entries and the second
  is a 1-D integer tensor with one entry per sample (how
  :func:`mixquant.quantize` reads it); otherwise every entry is a positional
  input. (A 1-D integer tensor meant as a second positional input goes in a
  dict instead.)

``calib_data`` is a tensor or a dict (one batch), or a DataLoader or any
iterable of batches (a tuple or list of batches included, as for
:func:`mixquant.quantize`: one ``(inputs, labels)`` batch is ``[(inputs, labels)]``).
Every tensor input has the samples along dim 0, and all of a batch's tensors
agree on that size. Floating-point inputs must be finite.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["Batch", "collect_batches", "provenance", "output_tensor", "num_samples"]


@dataclass
class Batch:
    """One calibration batch: ``model(*args, **kwargs)``, with optional ``labels`` (``[N]`` or ``[N, ...]``)."""

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any] = field(default_factory=dict)
    labels: Optional[torch.Tensor] = None

    @property
    def size(self) -> int:
        """Number of samples (dim 0 of the tensors)."""
        return next(t.shape[0] for t in self.tensors())

    def tensors(self) -> Iterator[torch.Tensor]:
        for a in self.args:
            if isinstance(a, torch.Tensor):
                yield a
        for k in sorted(self.kwargs):
            if isinstance(self.kwargs[k], torch.Tensor):
                yield self.kwargs[k]

    def _map(self, fn) -> "Batch":
        conv = lambda v: fn(v) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return Batch(tuple(conv(a) for a in self.args), {k: conv(v) for k, v in self.kwargs.items()},
                     None if self.labels is None else fn(self.labels))

    def to(self, device: torch.device) -> "Batch":
        return self._map(lambda t: t.to(device))

    def slice(self, start: int, stop: int) -> "Batch":
        """Samples ``start:stop`` of every tensor."""
        return self._map(lambda t: t[start:stop])

    def split(self, batch_size: int) -> List["Batch"]:
        """Consecutive sub-batches of at most ``batch_size`` samples."""
        n = self.size
        return [self.slice(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]

    def run(self, model: nn.Module) -> Any:
        return model(*self.args, **self.kwargs)


def _is_labels(t: Any, n: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 1 and not t.is_floating_point() \
        and not t.is_complex() and t.dtype != torch.bool and t.shape[0] == n


def _as_batch(raw: Any, index: int, what: str) -> Batch:
    if isinstance(raw, torch.Tensor):
        return Batch((raw,))
    if isinstance(raw, Mapping):
        kwargs = dict(raw)
        for key in kwargs:
            if not isinstance(key, str):
                raise TypeError(f"{what} batch {index}: dict keys must be argument names, got {key!r}")
        labels = kwargs.pop("labels", None)
        if labels is not None and not isinstance(labels, torch.Tensor):
            raise TypeError(f"{what} batch {index}: 'labels' must be a tensor, got {type(labels).__name__}")
        return Batch((), kwargs, labels)
    if isinstance(raw, (tuple, list)) and raw:
        first = raw[0]
        if len(raw) == 2 and isinstance(first, torch.Tensor) and first.dim() >= 1 and _is_labels(raw[1], first.shape[0]):
            return Batch((first,), {}, raw[1])
        return Batch(tuple(raw))
    raise TypeError(f"{what} batch {index} is a {type(raw).__name__}; expected a tensor, a dict of keyword inputs "
                    "or a tuple of positional inputs / (inputs, labels)")


def _check(batch: Batch, index: int, what: str) -> None:
    sizes = set()
    named = [(f"input {i}", a) for i, a in enumerate(batch.args)] + [(f"input {k!r}", v) for k, v in batch.kwargs.items()]
    for label, t in named:
        if not isinstance(t, torch.Tensor):
            continue
        if t.dim() == 0:
            raise ValueError(f"{what} batch {index}: {label} is a scalar; tensors need a batch dimension")
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{what} batch {index}: {label} holds {bad} non-finite value(s) (NaN or Inf)")
        sizes.add(t.shape[0])
    if not sizes:
        raise ValueError(f"{what} batch {index} holds no tensor input")
    if len(sizes) > 1:
        raise ValueError(f"{what} batch {index}: its tensors disagree on the number of samples {sorted(sizes)}")
    if batch.labels is not None:
        if batch.labels.dim() == 0 or batch.labels.shape[0] != next(iter(sizes)):
            raise ValueError(f"{what} batch {index}: {next(iter(sizes))} samples but labels of shape "
                             f"{tuple(batch.labels.shape)}")


def collect_batches(calib_data: Any, num_samples: Optional[int] = None, what: str = "calib_data") -> List[Batch]:
    """The batches of ``calib_data`` (see the module docstring), on the CPU, at most ``num_samples`` samples.

    ValueError for empty data, non-finite inputs or inconsistent batches;
    TypeError for anything that is not calibration data.
    """
    if calib_data is None:
        raise ValueError(f"{what} is required here (a tensor, a dict of inputs, a DataLoader or an iterable of batches)")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1):
        raise ValueError(f"the number of calibration samples must be a positive int or None, got {num_samples!r}")
    if isinstance(calib_data, (torch.Tensor, Mapping)):
        source: Iterable[Any] = [calib_data]
    elif isinstance(calib_data, (str, bytes)) or not hasattr(calib_data, "__iter__"):
        raise TypeError(f"{what} must be a tensor, a dict of inputs, a DataLoader or an iterable of batches, "
                        f"got {type(calib_data).__name__}")
    else:
        source = calib_data
    out: List[Batch] = []
    count = 0
    for i, raw in enumerate(source):
        batch = _as_batch(raw, i, what)
        _check(batch, i, what)
        batch = batch._map(lambda t: t.detach().cpu())
        if num_samples is not None and count + batch.size > num_samples:
            batch = batch.slice(0, num_samples - count)
        out.append(batch)
        count += batch.size
        if num_samples is not None and count >= num_samples:
            break
    if count == 0:
        raise ValueError(f"{what} is empty (no samples)")
    return out


def num_samples(batches: List[Batch]) -> int:
    return sum(b.size for b in batches)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def provenance(batches: List[Batch]) -> Dict[str, Any]:
    """``{"samples": N, "sha256": ...}``: a hash of every input and label, their names, dtypes and shapes."""
    h = hashlib.sha256()
    for b in batches:
        items = [(f"arg{i}", a) for i, a in enumerate(b.args)] + sorted(b.kwargs.items())
        if b.labels is not None:
            items.append(("labels", b.labels))
        for key, value in items:
            h.update(key.encode())
            if isinstance(value, torch.Tensor):
                h.update(f"{value.dtype}{tuple(value.shape)}".encode())
                h.update(_tensor_bytes(value))
            else:
                h.update(repr(value).encode())
    return {"samples": num_samples(batches), "sha256": h.hexdigest()}


def output_tensor(out: Any) -> torch.Tensor:
    """The tensor a model's output stands for: itself, ``logits`` of a dict-like output, else its first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        if isinstance(out.get("logits"), torch.Tensor):
            return out["logits"]
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    if isinstance(out, (tuple, list)):
        for v in out:
            if isinstance(v, torch.Tensor):
                return v
    raise TypeError(f"the model's output is a {type(out).__name__} holding no tensor")
