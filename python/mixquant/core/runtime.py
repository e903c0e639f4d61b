"""Process settings that keep mixquant's jobs fast when the CPU is shared with other work.

Two causes were measured (``benchmarks/bench_contention.py``, docs/BENCHMARKS.md):

* **OpenMP's active wait.** torch's intra-op pool (libgomp, which the native core
  shares: one OpenMP runtime per process) lets its idle threads spin after every
  parallel region. On a busy machine those spinning threads take the time slices
  that the thread doing the work needs, and BRECQ's many small parallel regions
  made a two-thread run burn three times the CPU of a one-thread run.
  ``OMP_WAIT_POLICY=PASSIVE`` makes them sleep instead. libgomp reads it once,
  when it is loaded (that is, when torch is imported), so it must be set
  before ``import torch``.
* **Page faults from the allocator.** glibc's malloc gives large blocks their
  own mapping and returns it to the kernel when they are freed (``mmap``/``munmap``,
  and heap trimming), so every reconstruction iteration faulted its
  activations' pages in again: system time was a third to a half of the user
  time. The mmap threshold cannot be raised above 32 MiB, and a batch of
  MobileNetV2 activations at 112x112 is larger, so the set-up serves every
  block from the heap (``M_MMAP_MAX=0``) and keeps up to 1 GiB of freed memory
  there (``M_TRIM_THRESHOLD``) for the next iteration. This can be done at any
  time and applies to later allocations; the cost is a process that holds on to
  its peak heap, which is what a quantization job wants.

:func:`prepare_process` applies both, unless the user chose otherwise through
the environment (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``, ``GLIBC_TUNABLES``,
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_MAX_``, or
``MIXQUANT_PROCESS_TUNING=0`` for none of this). The ``mixquant`` command calls
it first thing; a Python program can call it before it imports torch. This
module imports neither torch nor the rest of mixquant.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from typing import Dict

__all__ = ["prepare_process", "tune_malloc", "TRIM_THRESHOLD"]

#: Free memory kept at the top of the heap before it is given back to the kernel.
TRIM_THRESHOLD = 1 * 2**30

# mallopt parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_OPENMP_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
_MALLOC_ENV = ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_")


def _disabled() -> bool:
    return os.environ.get("MIXQUANT_PROCESS_TUNING", "").strip().lower() in ("0", "no", "off", "false")


def tune_malloc() -> bool:
    """Serve every block from glibc malloc's heap and keep freed memory there (see the module docstring); True if applied.

    Does nothing (False) on a C library other than glibc, when the environment
    already sets malloc's thresholds, or with ``MIXQUANT_PROCESS_TUNING=0``.
    """
    if _disabled() or any(k in os.environ for k in _MALLOC_ENV):
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # pragma: no cover - glibc always has it
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok)


def prepare_process() -> Dict[str, object]:
    """Apply the shared-CPU settings to this process; return what was done.

    ``OMP_WAIT_POLICY=PASSIVE`` only takes effect if torch (and with it
    OpenMP) is not imported yet; ``"openmp"`` in the result says whether it
    was set in time. An explicit setting in the environment is never replaced.
    """
    done: Dict[str, object] = {"openmp": False, "malloc": False}
    if _disabled():
        return done
    if not any(k in os.environ for k in _OPENMP_ENV) and "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        done["openmp"] = True
    done["malloc"] = tune_malloc()
    return done
