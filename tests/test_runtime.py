"""The process set-up of the mixquant command: OpenMP waits passively, freed blocks stay in the heap."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import os, resource, sys
from mixquant.core.runtime import prepare_process
done = prepare_process()
import torch
torch.set_num_threads(1)
x = torch.randn(8, 96, 112, 112)  # a batch of MobileNetV2 activations at 112x112: 38.5 MB, above any mmap threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # temporaries allocated and freed again, as every reconstruction iteration does
    y = torch.relu(x * 2.0) + 1.0
    del y
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(done["openmp"], done["malloc"], os.environ.get("OMP_WAIT_POLICY"), faults)
"""


def _probe(**env):
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "GLIBC_TUNABLES",
                                                             "MIXQUANT_PROCESS_TUNING")}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=full, timeout=120)
    assert out.returncode == 0, out.stderr
    openmp, malloc, policy, faults = out.stdout.split()
    return openmp == "True", malloc == "True", policy, int(faults)


glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                           reason="glibc malloc")


@glibc
def test_setup_stops_the_page_faults_of_large_blocks():
    openmp, malloc, policy, tuned = _probe()
    assert openmp and malloc and policy == "PASSIVE"
    _, malloc_off, policy_off, untuned = _probe(MIXQUANT_PROCESS_TUNING="0")
    assert not malloc_off and policy_off == "None"
    pages = 8 * 96 * 112 * 112 * 4 // 4096  # one temporary's pages
    assert untuned > 20 * pages  # every temporary of every round is faulted in afresh
    assert untuned > 2.5 * tuned  # the heap serves most of them again (in BRECQ: 27x fewer faults)


def test_explicit_settings_are_kept():
    openmp, _, policy, _ = _probe(OMP_WAIT_POLICY="ACTIVE")
    assert not openmp and policy == "ACTIVE"
    _, malloc, _, _ = _probe(GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")
    assert not malloc


def test_too_late_for_openmp_once_torch_is_imported(monkeypatch):
    import torch  # noqa: F401 - loaded, as in this test process

    from mixquant.core.runtime import prepare_process

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("MIXQUANT_PROCESS_TUNING", raising=False)
    assert prepare_process()["openmp"] is False and "OMP_WAIT_POLICY" not in os.environ


def test_the_command_sets_up_before_torch_loads():
    code = ("import sys; from mixquant.cli import main\n"
            "try:\n    main(['search', '--help'])\nexcept SystemExit:\n    pass\n"
            "import os; print(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                            "MIXQUANT_PROCESS_TUNING")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "PASSIVE", out.stderr
