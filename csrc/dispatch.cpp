// Run-time SIMD level selection (baseline ISA only).
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>

#include "simd.h"

namespace mixquant {
namespace {

// Process default level; changed only by init_simd_from_env() and set_simd_level().
// Each kernel call reads the table once, on the calling thread, so a
// concurrent switch never mixes levels inside one call.
std::atomic<int> g_level{static_cast<int>(SimdLevel::Scalar)};
// Override of the calling thread (-1: none), set by set_thread_simd_level():
// the Python layer's context-local level (mixquant.use_simd_level) is applied
// to the calling thread right before each native call.
thread_local int t_level = -1;

const KernelTable* compiled_table(SimdLevel level) {
  switch (level) {
    case SimdLevel::Scalar:
      return &kTableScalar;
    case SimdLevel::AVX2:
#ifdef MIXQUANT_HAVE_AVX2
      return &kTableAvx2;
#else
      return nullptr;
#endif
    case SimdLevel::AVX512:
#ifdef MIXQUANT_HAVE_AVX512
      return &kTableAvx512;
#else
      return nullptr;
#endif
  }
  return nullptr;
}

bool cpu_supports(SimdLevel level) {
  if (level == SimdLevel::Scalar) return true;
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(_M_X64))
  // __builtin_cpu_supports also checks that the OS saves the YMM/ZMM state.
  __builtin_cpu_init();
  if (level == SimdLevel::AVX2)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (level == SimdLevel::AVX512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("fma");
#endif
  return false;
}

}  // namespace

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::Scalar:
      return "scalar";
    case SimdLevel::AVX2:
      return "avx2";
    case SimdLevel::AVX512:
      return "avx512";
  }
  return "scalar";
}

bool parse_simd_level(const char* name, SimdLevel* out) {
  if (name == nullptr) return false;
  std::string s;
  for (const char* c = name; *c; ++c) {
    if (!std::isspace(static_cast<unsigned char>(*c)))
      s.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(*c))));
  }
  if (s == "scalar") {
    *out = SimdLevel::Scalar;
  } else if (s == "avx2") {
    *out = SimdLevel::AVX2;
  } else if (s == "avx512") {
    *out = SimdLevel::AVX512;
  } else {
    return false;
  }
  return true;
}

bool simd_level_supported(SimdLevel level) {
  return compiled_table(level) != nullptr && cpu_supports(level);
}

SimdLevel best_simd_level() {
  for (int l = static_cast<int>(SimdLevel::AVX512); l > 0; --l) {
    if (simd_level_supported(static_cast<SimdLevel>(l))) return static_cast<SimdLevel>(l);
  }
  return SimdLevel::Scalar;
}

SimdLevel current_simd_level() {
  return static_cast<SimdLevel>(t_level >= 0 ? t_level : g_level.load());
}

SimdLevel default_simd_level() { return static_cast<SimdLevel>(g_level.load()); }

bool set_thread_simd_level(SimdLevel level) {
  if (!simd_level_supported(level)) return false;
  t_level = static_cast<int>(level);
  return true;
}

void clear_thread_simd_level() { t_level = -1; }

bool set_simd_level(SimdLevel level) {
  if (!simd_level_supported(level)) return false;
  g_level.store(static_cast<int>(level));
  return true;
}

// MIXQUANT_SIMD=scalar|avx2|avx512 caps the level: the best supported level
// not above the requested one is used.  Unset, empty or unknown values select
// the best supported level; this never fails.
void init_simd_from_env() {
  SimdLevel level = best_simd_level();
  SimdLevel requested;
  const char* env = std::getenv("MIXQUANT_SIMD");
  if (env != nullptr && parse_simd_level(env, &requested)) {
    for (int l = static_cast<int>(requested); l >= 0; --l) {
      if (simd_level_supported(static_cast<SimdLevel>(l))) {
        level = static_cast<SimdLevel>(l);
        break;
      }
    }
  }
  g_level.store(static_cast<int>(level));
}

const KernelTable* current_table() {
  const KernelTable* t = compiled_table(current_simd_level());
  return t != nullptr ? t : &kTableScalar;
}

}  // namespace mixquant
