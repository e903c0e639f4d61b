#!/usr/bin/env bash
# Hardening CI: sanitizer build + kernel tests, a timed property fuzz of the
# binding under the sanitizers, and a timed libFuzzer run of the raw C++ ops.
#
#   bash tools/ci_hardening.sh            # ~4-5 minutes on 2 cores
#
# Installs what it needs (clang + compiler-rt + libomp from apt, the build
# and test requirements from PyPI) and is idempotent: caches live in build/
# (git-ignored).  Exits non-zero on a test failure, any sanitizer report or any
# fuzz finding.  Knobs: FUZZ_SECONDS (libFuzzer, default 60),
# PROPERTY_SECONDS (binding fuzz under ASan, default 45).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
PROPERTY_SECONDS="${PROPERTY_SECONDS:-45}"
PY="${PYTHON:-python3}"
start=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - start ))s] $*"; }

stamp "prerequisites"
if ! command -v clang++-14 >/dev/null 2>&1 || ! ls /usr/lib/llvm-14/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1 \
   || ! ls /usr/lib/llvm-14/lib/libomp.so* >/dev/null 2>&1; then
  SUDO=""; [[ $(id -u) == 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq clang-14 libclang-rt-14-dev libomp-14-dev >/dev/null
fi
command -v g++ >/dev/null 2>&1 || { echo "ci_hardening: g++ is required" >&2; exit 1; }
"$PY" -c "import scikit_build_core, pybind11, pytest, hypothesis, cmake, ninja" 2>/dev/null \
  || "$PY" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" pytest hypothesis cmake ninja

stamp "ASan/UBSan build, kernel + hardening tests, ${PROPERTY_SECONDS}s binding fuzz"
SAN_EXTRA_PYTEST="tests/test_hardening.py tests/test_concurrency.py tests/test_unpack_dequantize.py" \
  bash tools/sanitize.sh --fuzz-seconds "$PROPERTY_SECONDS"

stamp "libFuzzer harness of csrc/ops.h (${FUZZ_SECONDS}s)"
FUZZ_DIR="$ROOT/build/fuzz"
bash tools/fuzz/build_fuzzer.sh "$FUZZ_DIR"
mkdir -p "$FUZZ_DIR/corpus" "$FUZZ_DIR/artifacts"
rm -f "$FUZZ_DIR"/artifacts/*
# The corpus persists between local runs (it only grows coverage); CI starts empty.
set +e
"$FUZZ_DIR/fuzz_ops" -max_total_time="$FUZZ_SECONDS" -max_len=20000 -timeout=30 -rss_limit_mb=3072 \
  -artifact_prefix="$FUZZ_DIR/artifacts/" -print_final_stats=1 "$FUZZ_DIR/corpus" >"$FUZZ_DIR/fuzz.log" 2>&1
rc=$?
set -e
grep -E "^stat::(number_of_executed_units|new_units_added)|^Done" "$FUZZ_DIR/fuzz.log" || true
if [[ $rc != 0 ]] || compgen -G "$FUZZ_DIR/artifacts/*" >/dev/null; then
  echo "== ci_hardening: libFuzzer FOUND A PROBLEM (exit $rc); log tail:" >&2
  tail -60 "$FUZZ_DIR/fuzz.log" >&2
  ls -l "$FUZZ_DIR/artifacts" >&2
  exit 1
fi
stamp "ci_hardening: all clean"
