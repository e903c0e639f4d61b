"""Re-running a model from a layer onwards: the calls that finished before the layer replay their outputs.

Measuring how the model's output changes when one layer alone is quantized
(``sensitivity="model"``) needs one forward pass per layer and candidate
bit-width. Everything computed before the layer is the same in all of them, so
:class:`PrefixReplay` records one float pass and, while the layer's candidates
are evaluated, makes every module call that *finished before the layer first
ran* return its recorded output instead of computing it. Only the layer and
what follows it (plus the glue code of the modules that contain it, such as a
residual add) run again.

Which calls to replay is read from the recorded call tree: for the layer's
first call, the calls that ended before it started and whose caller was still
running then (so they are not inside another replayed call). It works for any
module whose execution does not depend on the data flowing through it (the
same calls in the same order every time; the recording checks this). A call
is identified by its module and its call count in the pass, so modules called
twice (a shared activation) replay only the calls made before the layer.
Replayed outputs are copies, so in-place operations downstream cannot damage
the record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.nn as nn

__all__ = ["PrefixReplay", "clone_output"]

CallKey = Tuple[int, int]  # (module index, call number within the pass)


def clone_output(obj: Any) -> Any:
    """A copy of a module output: tensors cloned inside tuples, lists and dicts (dict subclasses too)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, tuple):
        items = [clone_output(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [clone_output(v) for v in obj]
    if isinstance(obj, dict):
        out = obj.copy()  # keeps the class (OrderedDict, a ModelOutput, ...)
        for k, v in obj.items():
            out[k] = clone_output(v)
        return out
    return obj


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(v) for v in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    return 0


@dataclass
class _Call:
    module: int
    count: int
    start: int
    end: int
    parent: Optional[int]  # index of the enclosing call


class ReplayTooLarge(Exception):
    """The recorded outputs would exceed the memory limit."""


class PrefixReplay:
    """Record one float pass of ``run()`` and replay its prefix for the layers in ``targets``.

    Args:
        model: the model (in eval mode, under ``torch.no_grad``).
        run: a callable running ``model`` on the calibration batch and returning its output.
        targets: fully-qualified names of the layers whose candidates will be evaluated.
        max_bytes: limit on the recorded outputs; :class:`ReplayTooLarge` beyond it.
    """

    def __init__(self, model: nn.Module, run: Callable[[], Any], targets: List[str], max_bytes: float) -> None:
        self.model, self.run = model, run
        self.modules = [m for _, m in model.named_modules(remove_duplicate=True)]
        index = {id(m): i for i, m in enumerate(self.modules)}
        names = dict(model.named_modules())
        self.calls = self._record_calls(index, with_outputs=None)
        first: Dict[int, int] = {}
        for i, c in enumerate(self.calls):
            first.setdefault(c.module, i)
        self.replayed: Dict[str, Set[CallKey]] = {}
        for name in targets:
            mi = index[id(names[name])]
            if mi not in first:
                self.replayed[name] = set()  # never runs on this batch
                continue
            self.replayed[name] = self._prefix(first[mi])
        wanted = set().union(*self.replayed.values()) if self.replayed else set()
        self.outputs: Dict[CallKey, Any] = {}
        self._record_calls(index, with_outputs=wanted, max_bytes=max_bytes)

    def _prefix(self, layer_call: int) -> Set[CallKey]:
        """Calls that ended before ``layer_call`` started and were made by one of its running ancestors."""
        s = self.calls[layer_call].start
        running = set()
        p = self.calls[layer_call].parent
        while p is not None:
            running.add(p)
            p = self.calls[p].parent
        return {(c.module, c.count) for c in self.calls if c.end < s and (c.parent is None or c.parent in running)}

    def _record_calls(self, index: Dict[int, int], with_outputs: Optional[Set[CallKey]],
                      max_bytes: float = float("inf")) -> List[_Call]:
        calls: List[_Call] = []
        stack: List[int] = []
        counts: Dict[int, int] = {}
        clock = [0]
        stored = [0]
        handles = []

        def pre(module: nn.Module, _args: Any) -> None:
            mi = index[id(module)]
            k = counts.get(mi, 0)
            counts[mi] = k + 1
            calls.append(_Call(mi, k, clock[0], -1, stack[-1] if stack else None))
            clock[0] += 1
            stack.append(len(calls) - 1)

        def post(module: nn.Module, _args: Any, out: Any) -> None:
            ci = stack.pop()
            calls[ci].end = clock[0]
            clock[0] += 1
            key = (calls[ci].module, calls[ci].count)
            if with_outputs is not None and key in with_outputs:
                stored[0] += _nbytes(out)
                if stored[0] > max_bytes:
                    raise ReplayTooLarge(f"the recorded outputs exceed {max_bytes / 2**20:.0f} MB")
                self.outputs[key] = clone_output(out)

        for m in self.modules:
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        try:
            self.run()
        finally:
            for h in handles:
                h.remove()
        if with_outputs is not None:
            same = len(calls) == len(self.calls) and all(
                (a.module, a.count, a.parent) == (b.module, b.count, b.parent) for a, b in zip(calls, self.calls))
            if not same:
                raise RuntimeError("the model made different module calls on two passes over the same batch; "
                                   "it cannot be replayed")
        return calls

    def replay(self, name: str) -> Any:
        """``run()`` with the calls before layer ``name`` replayed from the record."""
        keys = self.replayed[name]
        if not keys:
            return self.run()
        patched: Dict[int, Callable[..., Any]] = {}
        counts: Dict[int, int] = {}
        outputs = self.outputs

        def make(mi: int, forward: Callable[..., Any]) -> Callable[..., Any]:
            def patched_forward(*args: Any, **kwargs: Any) -> Any:
                k = counts.get(mi, 0)
                counts[mi] = k + 1
                if (mi, k) in keys:
                    return clone_output(outputs[(mi, k)])
                return forward(*args, **kwargs)
            return patched_forward

        for mi in {m for m, _ in keys}:
            module = self.modules[mi]
            had = "forward" in module.__dict__
            patched[mi] = module.__dict__.get("forward") if had else None
            module.forward = make(mi, module.forward)
        try:
            return self.run()
        finally:
            for mi, original in patched.items():
                module = self.modules[mi]
                if original is None:
                    del module.forward
                else:
                    module.forward = original

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(v) for v in self.outputs.values())
