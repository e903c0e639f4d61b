"""Backend selection, thread policy and tensor hand-over to the native core.

Two backends compute every kernel: ``"native"`` (the C++ extension
``mixquant._core``) and ``"reference"`` (pure PyTorch, :mod:`mixquant.core.reference`).
The global default is ``"native"``; the environment variable
``MIXQUANT_BACKEND`` or :func:`set_backend` changes it, and every public
kernel takes a ``backend=`` argument that overrides it for one call.
"""

from __future__ import annotations

import contextlib
import os
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


def set_backend(name: str) -> None:
    """Set the global default backend: ``"native"`` (C++) or ``"reference"`` (PyTorch)."""
    global _default_backend
    _default_backend = _check_backend_name(name)


def get_backend() -> str:
    """The global default backend."""
    return _default_backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager that switches the global default backend for a block."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _check_backend_name(name: object) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def resolve_backend(backend: Optional[str]) -> str:
    """The backend a call uses: the explicit one, else the global default."""
    name = _default_backend if backend is None else _check_backend_name(backend)
    if name == "native" and _core is None:
        raise ImportError(
            "the native backend is unavailable (mixquant._core failed to import: "
            f"{_CORE_IMPORT_ERROR}); reinstall mixquant or use backend='reference'"
        )
    return name


def native() -> "object":
    """The compiled module (raises ImportError when it is missing)."""
    resolve_backend("native")
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
    """The SIMD level the native kernels use: ``"scalar"``, ``"avx2"`` or ``"avx512"``."""
    return native().simd_level()


def supported_simd_levels() -> list:
    """SIMD levels this CPU and build can run, weakest first."""
    return list(native().supported_simd_levels())


def set_simd_level(level: str) -> None:
    """Force a SIMD level (``MIXQUANT_SIMD`` sets it at import); ValueError if unsupported."""
    native().set_simd_level(level)


@contextlib.contextmanager
def use_simd_level(level: str) -> Iterator[None]:
    """Context manager that forces a SIMD level for a block."""
    previous = simd_level()
    set_simd_level(level)
    try:
        yield
    finally:
        set_simd_level(previous)
