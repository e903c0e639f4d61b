"""Every Python block of README.md runs verbatim, twice in the same folder (outputs exist the second time)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks() -> list:
    with open(README) as fh:
        text = fh.read()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_block_runs_verbatim(index, tmp_path):
    code = python_blocks()[index]
    env = dict(os.environ, PYTHONWARNINGS="error::DeprecationWarning")  # the README shows no deprecated call
    for attempt in (1, 2):
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300, env=env)
        assert out.returncode == 0, f"block {index} (run {attempt}) failed:\n{code}\n{out.stderr[-3000:]}"
