// AVX-512 build of the fused AdaRound step; the only rounding file compiled with -mavx512*.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#include <immintrin.h>

#include <cstdint>

#include "rounding.h"

#if !defined(__AVX512F__) || !defined(__AVX512DQ__) || !defined(__FMA__)
#error "rounding_avx512.cpp must be compiled with -mavx512f -mavx512bw -mavx512dq -mavx512vl -mfma"
#endif

namespace mixquant {
namespace rnd_avx512 {

struct RVec {
  using V = __m512;
  using M = __mmask16;
  static constexpr int64_t L = 16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float v) { return _mm512_set1_ps(v); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V sqrt(V a) { return _mm512_sqrt_ps(a); }
  static V abs(V a) { return _mm512_abs_ps(a); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V round_ne(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V prod_err(V a, V b, V p) { return _mm512_fmsub_ps(a, b, p); }
  static M ge(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static M le(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
  static M gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static M lt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static M mand(M a, M b) { return static_cast<M>(a & b); }
  static V blend(M m, V a, V b) { return _mm512_mask_blend_ps(m, b, a); }
  static V pow2i(V n) {
    const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
  static V split_exp(V a, V* k) {
    const __m512i b = _mm512_castps_si512(a);
    const __m512i t = _mm512_sub_epi32(b, _mm512_set1_epi32(0x3f400000));
    *k = _mm512_cvtepi32_ps(_mm512_srai_epi32(t, 23));
    return _mm512_castsi512_ps(_mm512_sub_epi32(b, _mm512_and_si512(t, _mm512_set1_epi32(static_cast<int>(0xff800000u)))));
  }
};

}  // namespace rnd_avx512
}  // namespace mixquant

#define MIXQUANT_RND_NS rnd_avx512
#define MIXQUANT_RND_TABLE kRoundingAvx512
#include "rounding_impl.h"
