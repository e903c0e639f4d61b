"""What a published wheel relies on: one OpenMP runtime (torch's), the metadata, the wheel build settings."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUNTIMES = """
import sys
{first}
import torch, mixquant
mixquant.search(torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 8)), avg_bits=4, num_threads=2)
torch.set_num_threads(2)
torch.randn(256, 256) @ torch.randn(256, 256)
maps = {{line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line or "libomp" in line}}
print("\\n".join(sorted(maps)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("first", ["import mixquant._core", "import torch", "import mixquant"])
def test_one_openmp_runtime_and_it_is_torchs(first):
    import torch

    out = subprocess.run([sys.executable, "-c", RUNTIMES.format(first=first)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    runtimes = out.stdout.split()
    assert len(runtimes) == 1, runtimes
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    if any(f.startswith("libgomp") for f in os.listdir(torch_lib)):  # torch ships its own: that one
        assert os.path.dirname(os.path.realpath(runtimes[0])) == os.path.realpath(torch_lib), runtimes


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)


def test_metadata_is_complete():
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    with open(os.path.join(ROOT, "LICENSE")) as fh:
        assert "Apache License" in fh.read(300)
    assert project["readme"] == "README.md" and os.path.isfile(os.path.join(ROOT, "README.md"))
    assert project["urls"] and all(u.startswith("https://") for u in project["urls"].values())
    versions = {c.rsplit(" ", 1)[-1] for c in project["classifiers"] if c.startswith("Programming Language :: Python :: 3.")}
    lowest = project["requires-python"].removeprefix(">=")
    assert lowest in versions
    assert os.path.isfile(os.path.join(ROOT, "python", "mixquant", "py.typed"))  # "Typing :: Typed"
    import mixquant

    assert project["version"] == mixquant.__version__


def test_wheels_leave_libgomp_to_torch_and_cover_both_architectures():
    cibw = _pyproject()["tool"]["cibuildwheel"]
    assert "--exclude libgomp.so.1" in cibw["linux"]["repair-wheel-command"]
    assert set(cibw["linux"]["archs"]) == {"x86_64", "aarch64"}
    assert "musllinux" in cibw["linux"]["musllinux-x86_64-image"]
    assert "tools/wheel_smoke.py" in cibw["test-command"] and os.path.isfile(os.path.join(ROOT, "tools", "wheel_smoke.py"))
    with open(os.path.join(ROOT, "CMakeLists.txt")) as fh:
        assert "$ORIGIN/../torch/lib" in fh.read()


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_cmake_adds_x86_flags_only_on_x86_64(tmp_path):
    pybind11 = pytest.importorskip("pybind11")

    def configure(processor: str) -> str:
        build = tmp_path / processor
        cmd = ["cmake", "-S", ROOT, "-B", str(build), "-DSKBUILD_PROJECT_NAME=mixquant",
               "-DSKBUILD_PROJECT_VERSION=0.1.0", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
               f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_SYSTEM_NAME=Linux",
               f"-DCMAKE_SYSTEM_PROCESSOR={processor}"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        with open(build / "CMakeCache.txt") as fh:
            cache = fh.read()
        return out.stdout + cache

    arm = configure("aarch64")
    assert "mixquant: SIMD kernels: scalar" in arm and "AVX2" not in arm.split("SIMD kernels:")[1].splitlines()[0]
    x86 = configure("x86_64")
    assert "MIXQUANT_HAVE_AVX2=1" in x86.split("SIMD kernels:")[1].splitlines()[0]
