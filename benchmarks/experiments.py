"""Run the MixQuant-vs-uniform experiments and write docs/RESULTS.md, docs/results.json and docs/img/*.png.

Thin wrapper around ``mixquant experiment`` with the repository's docs/ folder as the default output:

    python benchmarks/experiments.py                 # the documented run (about 40 min on 2 cores)
    python benchmarks/experiments.py --quick --out /tmp/exp
    python benchmarks/experiments.py --models resnet20 --methods brecq --seeds 3 --out /tmp/exp

Every option of ``mixquant experiment --help`` is accepted.
"""

from __future__ import annotations

import os
import sys

# Set before torch starts its thread pool: on a machine shared with other jobs, spinning OpenMP workers
# slow small kernels down by an order of magnitude.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mixquant.cli import main  # noqa: E402

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")

if __name__ == "__main__":
    argv = ["experiment"] + sys.argv[1:]
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv += ["--out", DOCS]
    sys.exit(main(argv))
