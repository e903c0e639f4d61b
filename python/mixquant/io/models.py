"""Loading a user's model from a file or a factory, safely by default."""

from __future__ import annotations

import importlib
import os
import pickle
import warnings
import zipfile

import torch
import torch.nn as nn

MODEL_HELP = (
    "MODEL is 'package.module:factory' (a callable returning an nn.Module, called with no "
    "arguments), a TorchScript file (torch.jit.save), or a file written by torch.save of a whole "
    "module. Both kinds of file can run code when loaded (unpickling executes what the pickle names; a "
    "TorchScript module's __setstate__ runs on load), so they need --trust-file: pass it only for files "
    "from a source you trust. A state_dict file (torch.save(model.state_dict())) never runs code, but "
    "needs the architecture from a factory instead."
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


def load_model(spec: str, *, trust_file: bool = False) -> nn.Module:
    """Load the model named by ``spec`` (see :data:`MODEL_HELP`), in eval mode.

    ``trust_file`` allows what can run code from a file: a TorchScript file and
    a pickled whole module. Without it only the safe loader
    (``torch.load(weights_only=True)``) ever sees the file, and a file that
    needs more is a ValueError saying so.
    """
    if os.path.exists(spec):
        if not os.path.isfile(spec):  # a directory, FIFO or device would hang or mislead the loaders
            raise ValueError(f"{spec!r} is not a regular file")
        model = _load_file(spec, trust_file)
    elif ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot find factory {spec!r}: {exc}") from None
        model = factory()
    else:
        raise FileNotFoundError(f"{spec!r} is neither a file nor a 'package.module:factory' path")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _load_file(path: str, trust_file: bool) -> nn.Module:
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
                f"{path!r} holds objects that the safe loader (weights_only=True) refuses "
                f"({str(exc).splitlines()[0][:200]}). If it is a whole pickled module from a source you "
                "trust, pass --trust-file: unpickling can execute code from the file."
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
                         "for the architecture instead")
    return obj
