// Threaded drivers of the fused AdaRound step (baseline ISA).  The SIMD table
// is read once, on the calling thread (whose level may be overridden), before
// any worker starts; elements are independent, so the result does not depend
// on the number of threads.
#include <cstdint>

#include "rounding.h"

namespace mixquant {

const RoundingTable* current_rounding_table() {
  switch (current_simd_level()) {
#ifdef MIXQUANT_HAVE_AVX512
    case SimdLevel::AVX512:
      return &kRoundingAvx512;
#endif
#ifdef MIXQUANT_HAVE_AVX2
    case SimdLevel::AVX2:
      return &kRoundingAvx2;
#endif
    default:
      return &kRoundingScalar;
  }
}

namespace {

// Chunks of 16 Ki elements (a multiple of every lane count); small arrays run on the caller.
constexpr int64_t kChunk = 1 << 14;

template <class Fn>
void for_chunks(int64_t n, int num_threads, const Fn& fn) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int nt = chunks < num_threads ? static_cast<int>(chunks) : num_threads;
  if (nt <= 1) {
    fn(0, n);
    return;
  }
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t lo = c * kChunk;
    fn(lo, (n - lo) < kChunk ? (n - lo) : kChunk);
  }
}

}  // namespace

void rounding_weight(const float* V, const float* fl, const float* sc, const float* lo, const float* hi, int64_t n,
                     int num_threads, float* w) {
  const RoundingTable* t = current_rounding_table();
  for_chunks(n, num_threads, [&](int64_t a, int64_t len) { t->weight(V + a, fl + a, sc + a, lo + a, hi + a, len, w + a); });
}

void rounding_step(float* V, const float* fl, const float* sc, const float* lo, const float* hi, const float* gw,
                   float* m, float* v, const RoundingStep& p, int64_t n, int num_threads, float* w) {
  const RoundingTable* t = current_rounding_table();
  for_chunks(n, num_threads, [&](int64_t a, int64_t len) {
    t->step(V + a, fl + a, sc + a, lo + a, hi + a, gw + a, m + a, v + a, p, len, w + a);
  });
}

}  // namespace mixquant
