#!/usr/bin/env bash
# Build the libFuzzer harness tools/fuzz/fuzz_ops.cpp against csrc/ with
# clang, AddressSanitizer and UndefinedBehaviorSanitizer (float-cast-overflow
# included, every report fatal).  Output: $BUILD/fuzz_ops (default build/fuzz).
# Needs clang++ with the compiler-rt fuzzer runtime (Debian: clang-14,
# libclang-rt-14-dev; libomp-14-dev for OpenMP, else the core runs serially).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BUILD="${1:-$ROOT/build/fuzz}"
CXX="${FUZZ_CXX:-}"
if [[ -z "$CXX" ]]; then
  for c in clang++-14 clang++-16 clang++-15 clang++; do
    if command -v "$c" >/dev/null 2>&1; then CXX="$c"; break; fi
  done
fi
[[ -n "$CXX" ]] || { echo "build_fuzzer: no clang++ found" >&2; exit 1; }
mkdir -p "$BUILD"
SAN="-fsanitize=fuzzer-no-link,address,undefined,float-cast-overflow -fno-sanitize-recover=all"
COMMON="-std=c++17 -O1 -g -fno-omit-frame-pointer -ffp-contract=off -fno-math-errno -I$ROOT/csrc"
OMP=""
if echo 'int main(){}' | "$CXX" -x c++ -fopenmp - -o "$BUILD/omp_probe" >/dev/null 2>&1; then
  OMP="-fopenmp"
fi
DEFS="-DMIXQUANT_HAVE_AVX2=1 -DMIXQUANT_HAVE_AVX512=1"
objs=()
compile() {  # src extra-flags...
  local src="$1"; shift
  local obj="$BUILD/$(basename "${src%.cpp}").o"
  "$CXX" $COMMON $SAN $OMP $DEFS "$@" -c "$src" -o "$obj"
  objs+=("$obj")
}
compile "$ROOT/csrc/ops.cpp"
compile "$ROOT/csrc/dispatch.cpp"
compile "$ROOT/csrc/kernels_scalar.cpp"
compile "$ROOT/csrc/kernels_avx2.cpp" -mavx2 -mfma
compile "$ROOT/csrc/kernels_avx512.cpp" -mavx512f -mavx512bw -mavx512dq -mavx512vl -mfma
compile "$ROOT/tools/fuzz/fuzz_ops.cpp"
"$CXX" -fsanitize=fuzzer,address,undefined,float-cast-overflow $OMP "${objs[@]}" -o "$BUILD/fuzz_ops"
echo "built $BUILD/fuzz_ops with $CXX ${OMP:-(no OpenMP)}"
