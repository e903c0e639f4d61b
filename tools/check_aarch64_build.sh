#!/usr/bin/env bash
# Cross-compile the native core for aarch64 (scalar kernels only: CMake adds x86 ISA flags only
# on x86-64) and show what the module links. Needs g++-aarch64-linux-gnu (apt) plus cmake,
# ninja and pybind11 in the current Python; about a minute on 2 cores.
#
#   bash tools/check_aarch64_build.sh [BUILD_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT/build/aarch64}"
PY="${PYTHON:-python3}"
command -v aarch64-linux-gnu-g++ >/dev/null || { echo "needs aarch64-linux-gnu-g++ (apt-get install g++-aarch64-linux-gnu)" >&2; exit 1; }
INC="$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
rm -rf "$OUT"
# The host's Python headers serve: the module links no libpython, and the ABI's sizes agree on LP64.
cmake -S "$ROOT" -B "$OUT" -G Ninja -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
  -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ -DSKBUILD_PROJECT_NAME=mixquant -DSKBUILD_PROJECT_VERSION=0.1.0 \
  -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v "$PY")" \
  -DPython_INCLUDE_DIR="$INC" -DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER -DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=NEVER \
  -DPython_SOABI=cpython-aarch64-linux-gnu | grep "mixquant:"
cmake --build "$OUT" 2>&1 | grep -iE "warning|error" && { echo "compiler warnings or errors" >&2; exit 1; }
file "$OUT"/_core*.so
aarch64-linux-gnu-readelf -d "$OUT"/_core*.so | grep -E "NEEDED|RUNPATH"
