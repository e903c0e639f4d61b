// AVX2 build of the fused AdaRound step; the only rounding file compiled with -mavx2 -mfma.
#include <immintrin.h>

#include <cstdint>

#include "rounding.h"

#if !defined(__AVX2__) || !defined(__FMA__)
#error "rounding_avx2.cpp must be compiled with -mavx2 -mfma"
#endif

namespace mixquant {
namespace rnd_avx2 {

struct RVec {
  using V = __m256;
  using M = __m256;
  static constexpr int64_t L = 8;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float v) { return _mm256_set1_ps(v); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V sqrt(V a) { return _mm256_sqrt_ps(a); }
  static V abs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V round_ne(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V prod_err(V a, V b, V p) { return _mm256_fmsub_ps(a, b, p); }
  static M ge(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  static M le(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LE_OQ); }
  static M gt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static M lt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static M mand(M a, M b) { return _mm256_and_ps(a, b); }
  static V blend(M m, V a, V b) { return _mm256_blendv_ps(b, a, m); }
  static V pow2i(V n) {
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  static V split_exp(V a, V* k) {
    const __m256i b = _mm256_castps_si256(a);
    const __m256i t = _mm256_sub_epi32(b, _mm256_set1_epi32(0x3f400000));
    *k = _mm256_cvtepi32_ps(_mm256_srai_epi32(t, 23));
    return _mm256_castsi256_ps(_mm256_sub_epi32(b, _mm256_and_si256(t, _mm256_set1_epi32(static_cast<int>(0xff800000u)))));
  }
};

}  // namespace rnd_avx2
}  // namespace mixquant

#define MIXQUANT_RND_NS rnd_avx2
#define MIXQUANT_RND_TABLE kRoundingAvx2
#include "rounding_impl.h"
