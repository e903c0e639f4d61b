"""Backend, SIMD level and thread selection for the native core.

Two backends compute every kernel: ``"native"`` (the C++ extension
``mixquant._core``) and ``"reference"`` (pure PyTorch, :mod:`mixquant.core.reference`).
The process default is ``"native"``; the environment variable
``MIXQUANT_BACKEND`` or :func:`set_backend` changes it, and every public
kernel takes a ``backend=`` argument that overrides it for one call.

:func:`use_backend` and :func:`use_simd_level` override the default for a
``with`` block in the current context only (``contextvars``: the thread, or
the asyncio task, that entered the block); other threads keep the default.
The context's SIMD level is applied to the calling thread right before each
native call (:func:`native`), so two threads with overlapping blocks never see
each other's level.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from typing import Iterator, Optional

import numpy as np
import torch

try:  # the compiled core; absent only in a broken or source-only install
    from .. import _core
except ImportError as exc:  # pragma: no cover - exercised only without a build
    _core = None
    _CORE_IMPORT_ERROR: Optional[ImportError] = exc
else:
    _CORE_IMPORT_ERROR = None

BACKENDS = ("native", "reference")


def _initial_backend() -> str:
    name = os.environ.get("MIXQUANT_BACKEND", "native").strip().lower() or "native"
    return name if name in BACKENDS else "native"


_default_backend = _initial_backend()
# Context-local overrides (None: the process default).
_backend_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("mixquant_backend", default=None)
_simd_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("mixquant_simd_level", default=None)
# The SIMD override last applied to each thread's native state.
_applied = threading.local()


def set_backend(name: str) -> None:
    """Set the process default backend: ``"native"`` (C++) or ``"reference"`` (PyTorch)."""
    global _default_backend
    _default_backend = _check_backend_name(name)


def get_backend() -> str:
    """The backend in use here: the context's override (:func:`use_backend`), else the process default."""
    override = _backend_override.get()
    return _default_backend if override is None else override


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use backend ``name`` inside the block, in this context only (other threads keep theirs)."""
    token = _backend_override.set(_check_backend_name(name))
    try:
        yield
    finally:
        _backend_override.reset(token)


def _check_backend_name(name: object) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def resolve_backend(backend: Optional[str]) -> str:
    """The backend a call uses: the explicit one, else :func:`get_backend`."""
    name = get_backend() if backend is None else _check_backend_name(backend)
    if name == "native" and _core is None:
        raise ImportError(
            "the native backend is unavailable (mixquant._core failed to import: "
            f"{_CORE_IMPORT_ERROR}); reinstall mixquant or use backend='reference'"
        )
    return name


def native() -> "object":
    """The compiled module, with this context's SIMD level applied to the calling thread.

    Raises ImportError when the module is missing. Call it right before each
    native call (``native().fn(...)``): the level is set per thread.
    """
    resolve_backend("native")
    want = _simd_override.get()
    if getattr(_applied, "level", None) != want:
        _core.set_thread_simd_level(want)
        _applied.level = want
    return _core


def resolve_threads(num_threads: Optional[int]) -> int:
    """Thread count for a native call.

    An explicit ``num_threads`` wins, then ``MIXQUANT_NUM_THREADS``, then
    ``torch.get_num_threads()`` so the core never uses more threads than the
    torch work around it was given.
    """
    if num_threads is None:
        env = os.environ.get("MIXQUANT_NUM_THREADS", "").strip()
        if env:
            try:
                num_threads = int(env)
            except ValueError:
                raise ValueError(f"MIXQUANT_NUM_THREADS must be a positive integer, got {env!r}") from None
            if num_threads < 1:
                raise ValueError(f"MIXQUANT_NUM_THREADS must be a positive integer, got {env!r}")
        else:
            num_threads = torch.get_num_threads()
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)):
        raise TypeError(f"num_threads must be an int, got {type(num_threads).__name__}")
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    return int(num_threads)


def simd_level() -> str:
    """The SIMD level native calls made here use: ``"scalar"``, ``"avx2"`` or ``"avx512"``."""
    return native().simd_level()


def supported_simd_levels() -> list:
    """SIMD levels this CPU and build can run, weakest first."""
    return list(native().supported_simd_levels())


def set_simd_level(level: str) -> None:
    """Set the process default SIMD level (``MIXQUANT_SIMD`` sets it at import); ValueError if unsupported.

    A :func:`use_simd_level` block in force here still wins over it.
    """
    native().set_simd_level(level)


@contextlib.contextmanager
def use_simd_level(level: str) -> Iterator[None]:
    """Use SIMD level ``level`` inside the block, in this context only (other threads keep theirs).

    ValueError (before the block) if the level is unknown or unsupported.
    """
    name = level.strip().lower() if isinstance(level, str) else level
    if name not in supported_simd_levels():
        _applied.level = "?"  # the probe below may touch this thread's state: re-apply on the next call
        native().set_thread_simd_level(level)  # raises the binding's ValueError (TypeError for a non-str)
    token = _simd_override.set(name)
    try:
        yield
    finally:
        _simd_override.reset(token)
