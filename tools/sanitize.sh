#!/usr/bin/env bash
# Build mixquant's native core with AddressSanitizer + UndefinedBehaviorSanitizer
# into a throwaway directory and run the kernel tests (and optionally a timed
# property fuzz of the binding) against that build.  The normal install is not
# touched: the sanitized package lives in $SAN_DIR/site, which is put first on
# PYTHONPATH together with a sitecustomize.py that drops the editable-install
# import hook for mixquant, so "import mixquant" resolves to the sanitized copy.
#
#   tools/sanitize.sh                     # build + kernel tests
#   tools/sanitize.sh --fuzz-seconds 30   # ... + 30 s of tools/fuzz/fuzz_binding.py
#   tools/sanitize.sh --no-tests          # build only
#
# Environment: SAN_DIR (default build/sanitize), SAN_SANITIZERS (default
# address,undefined,float-cast-overflow), SAN_EXTRA_PYTEST (more test files).
# Exit status: non-zero on a build failure, a failing test or any sanitizer
# report (reports are also collected from $SAN_DIR/logs and echoed).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SAN_DIR="${SAN_DIR:-$ROOT/build/sanitize}"
SANITIZERS="${SAN_SANITIZERS:-address,undefined,float-cast-overflow}"
FUZZ_SECONDS=0
RUN_TESTS=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --fuzz-seconds) FUZZ_SECONDS="$2"; shift 2 ;;
    --no-tests) RUN_TESTS=0; shift ;;
    *) echo "sanitize.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
SITE="$SAN_DIR/site"
LOGS="$SAN_DIR/logs"
mkdir -p "$SAN_DIR"

echo "== sanitize: building the core with -fsanitize=$SANITIZERS (g++) into $SITE"
# GCC: its libasan is preloaded below; a clang build would need clang's runtime.
export CXX="${SAN_CXX:-g++}"
rm -rf "$SITE"
"$PY" -m pip install -q --no-build-isolation --no-deps --target "$SITE" \
  -Ccmake.define.MIXQUANT_SANITIZE="$SANITIZERS" \
  -Ccmake.build-type=RelWithDebInfo \
  -Cbuild-dir="$SAN_DIR/cmake" \
  "$ROOT"
cat > "$SITE/sitecustomize.py" <<'PYEOF'
# Written by tools/sanitize.sh: let this directory's mixquant win over an
# editable install (whose import hook sits first on sys.meta_path).
import sys
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "ScikitBuildRedirectingFinder"]
PYEOF

CORE_SO="$(ls "$SITE"/mixquant/_core*.so)"
ASAN_RT="$(ldd "$CORE_SO" | awk '/libasan/ {print $3}')"
[[ -n "$ASAN_RT" && -e "$ASAN_RT" ]] || { echo "sanitize: $CORE_SO is not linked to libasan" >&2; exit 1; }
# libstdc++ is preloaded too: ASan resolves its __cxa_throw interceptor at
# start-up, and the python binary itself does not link libstdc++.
CXX_RT="$(ldd "$CORE_SO" | awk '/libstdc\+\+/ {print $3}')"
rm -rf "$LOGS"; mkdir -p "$LOGS"
export LD_PRELOAD="$ASAN_RT${CXX_RT:+:$CXX_RT}${LD_PRELOAD:+:$LD_PRELOAD}"
# The interpreter and torch are not instrumented and leak by design at exit.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_stack_use_after_return=0:log_path=$LOGS/asan:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$LOGS/ubsan:${UBSAN_OPTIONS:-}"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONFAULTHANDLER=1
# Few threads: the sanitized kernels are slower and the machine is shared.
export MIXQUANT_NUM_THREADS="${MIXQUANT_NUM_THREADS:-2}"

"$PY" - "$SITE" <<'PYEOF'
import sys
import mixquant, mixquant._core as c
assert mixquant._core.__file__.startswith(sys.argv[1]), f"wrong core imported: {c.__file__}"
print(f"== sanitize: using {c.__file__} (levels {c.supported_simd_levels()}, openmp {c.has_openmp()})")
PYEOF

status=0
report() {
  if compgen -G "$LOGS/*" >/dev/null; then
    echo "== sanitize: SANITIZER REPORTS:" >&2
    cat "$LOGS"/* >&2
    return 1
  fi
  return 0
}

if [[ $RUN_TESTS == 1 ]]; then
  echo "== sanitize: kernel tests under ASan/UBSan"
  # -p no:cacheprovider: nothing written into the repository.
  (cd "$ROOT" && "$PY" -m pytest -q -x -p no:cacheprovider \
      tests/test_core_binding.py tests/test_native_vs_reference.py tests/test_api.py \
      ${SAN_EXTRA_PYTEST:-}) || status=1
  report || status=1
fi
if [[ $status == 0 && $FUZZ_SECONDS -gt 0 ]]; then
  echo "== sanitize: ${FUZZ_SECONDS}s property fuzz of the binding under ASan/UBSan"
  "$PY" "$ROOT/tools/fuzz/fuzz_binding.py" --seconds "$FUZZ_SECONDS" || status=1
  report || status=1
fi
if [[ $status != 0 ]]; then
  echo "== sanitize: FAILED" >&2
else
  echo "== sanitize: clean"
fi
exit $status
