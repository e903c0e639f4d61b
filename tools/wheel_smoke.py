"""Smoke test of an installed mixquant wheel, run from outside the source tree (CI, cibuildwheel).

Checks, in a few seconds, that the installed package (not a source checkout)
imports, that its native core loads and agrees with the reference path, that
search -> quantize -> export -> load_quantized round-trips bit-exactly, that
the ``mixquant`` command runs, and that the process holds one OpenMP runtime.

    python tools/wheel_smoke.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile


def _openmp_runtimes() -> set:
    """Paths of the OpenMP runtimes mapped into this process (Linux)."""
    try:
        with open("/proc/self/maps") as fh:
            return {line.split()[-1] for line in fh if "libgomp" in line or "libomp" in line or "libiomp" in line}
    except OSError:  # not Linux
        return set()


def main() -> int:
    import mixquant

    here = os.path.dirname(os.path.abspath(__file__))
    where = os.path.dirname(os.path.abspath(mixquant.__file__))
    source = os.path.join(os.path.dirname(here), "python") + os.sep  # the package's sources in the checkout
    assert not (where + os.sep).startswith(source), f"mixquant imported from the source tree: {where}"
    import torch
    import torch.nn as nn

    levels = mixquant.supported_simd_levels()
    w = torch.randn(64, 300, generator=torch.Generator().manual_seed(0))
    for level in levels:
        with mixquant.use_simd_level(level):
            native = mixquant.roundoff_error(w, per_channel=True, backend="native")
        ref = mixquant.roundoff_error(w, per_channel=True, backend="reference")
        assert (native.scale == ref.scale).all() and (native.zero_point == ref.zero_point).all(), level
        assert abs(native.sse - ref.sse).max() <= 1e-5 * abs(ref.sse).max(), level

    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()

    model, x = make(), torch.randn(4, 3, 8, 8)
    config = mixquant.search(model, qem=16.0, keep=mixquant.keep_first_last(model, x[:1]))
    qmodel = mixquant.quantize(model, config, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "q.safetensors")
        mixquant.export(qmodel, path)
        restored = mixquant.load_quantized(path, make())
        with torch.no_grad():
            assert torch.equal(restored(x), qmodel(x))
    runtimes = _openmp_runtimes()
    assert len(runtimes) <= 1, f"more than one OpenMP runtime in the process: {sorted(runtimes)}"
    cli = subprocess.run([sys.executable, "-m", "mixquant", "--help"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and "search" in cli.stdout, cli.stderr
    print(f"mixquant {mixquant.__version__} from {where}: SIMD {levels}, "
          f"OpenMP {sorted(runtimes) or 'none mapped'}, round trip bit-exact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
