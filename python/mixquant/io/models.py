"""Loading a user's model from a file or a factory, safely by default.

torch is imported inside the functions: the command line reads :data:`MODEL_HELP`
for its ``--help`` without loading it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
import sys
import warnings
import zipfile
from typing import TYPE_CHECKING, Iterator, Optional

if TYPE_CHECKING:
    import torch.nn as nn

MODEL_HELP = (
    "MODEL is 'package.module:factory' (a callable returning an nn.Module, called with no "
    "arguments; the module is looked up in the current folder first, as `python -m` does), a TorchScript "
    "file (torch.jit.save), or a file written by torch.save of a whole module. Both kinds of file can "
    "run code when loaded (unpickling executes what the pickle names; a TorchScript module's "
    "__setstate__ runs on load), so they need --trust-file: pass it only for files from a source you "
    "trust. A state_dict file never runs code: --weights FILE loads one (torch.save or .safetensors) "
    "into the model MODEL gives."
)


# A legacy (non-zip) torch.save file opens with the pickled magic number.
_LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.split("/", 1)[-1].startswith("code/") for name in zf.namelist())


def _looks_like_torch_save(path: str) -> bool:
    """A zip archive (torch.save's format since 1.6) or a legacy torch.save pickle."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as fh:
        head = fh.read(64)
    return head[:1] == b"\x80" and _LEGACY_MAGIC in head


@contextlib.contextmanager
def _current_folder_first() -> Iterator[None]:
    """Put the current folder at the front of ``sys.path`` for the block, as ``python -m`` does."""
    cwd = os.getcwd()
    added = cwd not in sys.path[:1]
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            try:
                sys.path.remove(cwd)
            except ValueError:  # the factory removed it itself
                pass


def _factory(spec: str) -> "nn.Module":
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{spec!r} is not a 'package.module:factory' path")
    try:
        with _current_folder_first():
            factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot find factory {spec!r}: {exc}") from None
    if not callable(factory):
        raise TypeError(f"{spec!r} is a {type(factory).__name__}, not a callable that returns a model")
    return factory()


def load_model(spec: str, *, trust_file: bool = False, weights: Optional[str] = None) -> "nn.Module":
    """Load the model named by ``spec`` (see :data:`MODEL_HELP`), in eval mode.

    ``trust_file`` allows what can run code from a file: a TorchScript file and
    a pickled whole module. Without it only the safe loader
    (``torch.load(weights_only=True)``) ever sees the file, and a file that
    needs more is a ValueError saying so.

    ``weights``: a state_dict file (``torch.save`` or ``.safetensors``) loaded into the
    model with ``strict=True``; a missing, unexpected or ill-shaped entry is a ValueError.
    """
    import torch.nn as nn

    if os.path.exists(spec):
        if not os.path.isfile(spec):  # a directory, FIFO or device would hang or mislead the loaders
            raise ValueError(f"{spec!r} is not a regular file")
        model = _load_file(spec, trust_file)
    elif ":" in spec:
        model = _factory(spec)
    else:
        raise FileNotFoundError(f"{spec!r} is neither a file nor a 'package.module:factory' path")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def _read_state_dict(path: str) -> dict:
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--weights {path!r} is not a file")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as exc:  # pragma: no cover - declared dependency
            raise ImportError("reading .safetensors weights needs the 'safetensors' package") from exc
        try:
            return load_file(path, device="cpu")
        except Exception as exc:  # noqa: BLE001 - the reader's own errors, reported as one type
            raise ValueError(f"{path!r} is not a readable safetensors file: {exc}") from None
    if not _looks_like_torch_save(path):
        raise ValueError(f"{path!r} is not a torch.save or .safetensors file (or it is damaged or truncated)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path!r} is not a plain state_dict: {_refusal(exc)}") from None
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path!r} is not a readable torch file: {type(exc).__name__}: {exc}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # the common {"state_dict": ..., "epoch": ...} checkpoint
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"{path!r} does not hold a state_dict (a dict of names to tensors)")
    return obj


def load_weights(model: "nn.Module", path: str) -> None:
    """Load the state_dict in ``path`` into ``model`` (strict); ValueError naming what does not match."""
    state = _read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]!r})")
        raise ValueError(f"--weights {path!r} does not fit the model: {', '.join(parts)}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"--weights {path!r}: {key!r} has shape {tuple(value.shape)}, the model's is "
                             f"{tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=True)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _refusal(exc: BaseException) -> str:
    """What torch's safe loader refused, in one clean sentence (no colour codes, nothing cut off)."""
    text = _ANSI.sub("", str(exc))
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it refers to {found.group(1)}, which the safe loader does not allow"
    found = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    if found:
        return found.group(1).strip()
    return "it holds objects the safe loader does not allow"


def _load_file(path: str, trust_file: bool) -> "nn.Module":
    import torch

    try:
        torchscript = _is_torchscript(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ValueError(f"{path!r} is not a readable model file: {exc}") from None
    if torchscript:
        if not trust_file:
            raise ValueError(
                f"{path!r} is a TorchScript file, and loading one runs code stored in it (its __setstate__). "
                "If it comes from a source you trust, pass --trust-file (trust_file=True); otherwise use a "
                "state_dict and a 'package.module:factory'."
            )
        with warnings.catch_warnings():  # torch marks TorchScript deprecated; the file is still valid
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                return torch.jit.load(path, map_location="cpu")
            except (RuntimeError, OSError, EOFError, ValueError) as exc:
                raise ValueError(f"{path!r} is not a readable TorchScript file: {exc}") from None
    # Anything else must be a torch.save file; other bytes (a bare pickle, garbage) are never
    # handed to an unpickler, with or without --trust-file.
    if not _looks_like_torch_save(path):
        raise ValueError(f"{path!r} is not a torch.save or TorchScript file (or it is damaged or truncated)")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": not the user's concern
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_file:
            raise ValueError(
                f"{path!r} cannot be loaded safely: {_refusal(exc)}. If it is a whole pickled module from a "
                "source you trust, pass --trust-file: unpickling can execute code from the file."
            ) from None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # unpickling can raise anything; report it, never a traceback
            raise ValueError(f"{path!r} could not be unpickled: {type(exc).__name__}: {exc}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"{path!r} is not a readable torch file: {type(exc).__name__}: {exc}") from None
    if isinstance(obj, dict):
        raise ValueError(f"{path!r} holds a state_dict, not a model: pass 'package.module:factory' "
                         f"for the architecture and --weights {path} for its weights")
    return obj
