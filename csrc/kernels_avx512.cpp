// AVX-512 (F/BW/DQ/VL) kernels.  This is the only file compiled with -mavx512*.
// GCC 12's own AVX-512 headers trip -Wmaybe-uninitialized (GCC bug 105593,
// the `__Y = __Y` idiom of _mm512_undefined_*); silence it for this file only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#include <immintrin.h>

#include <cstdint>

#include "simd.h"

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512DQ__) || \
    !defined(__AVX512VL__) || !defined(__FMA__)
#error "kernels_avx512.cpp must be compiled with -mavx512f -mavx512bw -mavx512dq -mavx512vl -mfma"
#endif

namespace mixquant {
namespace isa_avx512 {

struct Vec {
  using V = __m512;
  static constexpr int64_t L = 16;

  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V load_int(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static V load_int(const uint16_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
  }
  // v holds exact integers in [0, qmax] (qmax <= 255 for uint8 outputs).
  static void store_int(uint16_t* p, V v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(v)));
  }
  static void store_int(uint8_t* p, V v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
  }
  static V set1(float v) { return _mm512_set1_ps(v); }
  static V zero() { return _mm512_setzero_ps(); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V prod_err(V a, V b, V p) { return _mm512_fmsub_ps(a, b, p); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  // imm8 = 0x08: round to nearest even, no scaling, suppress exceptions.
  static V round_ne(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V abs(V x) { return _mm512_abs_ps(x); }
  // max(m, |e|) for finite e and m >= 0 in one instruction: VRANGEPS with
  // imm8 = 0b1011 (larger magnitude, sign cleared).
  static V absmax(V m, V e) { return _mm512_range_ps(m, e, 0x0B); }
  static double hsum(V x) {
    const __m512d a = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
    const __m512d b = _mm512_cvtps_pd(_mm512_extractf32x8_ps(x, 1));
    const __m512d s = _mm512_add_pd(a, b);
    const __m256d s4 = _mm256_add_pd(_mm512_castpd512_pd256(s), _mm512_extractf64x4_pd(s, 1));
    __m128d t = _mm_add_pd(_mm256_castpd256_pd128(s4), _mm256_extractf128_pd(s4, 1));
    t = _mm_add_sd(t, _mm_unpackhi_pd(t, t));
    return _mm_cvtsd_f64(t);
  }
  static float hmax(V x) {
    const __m256 h = _mm256_max_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1));
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  static float hmin(V x) {
    const __m256 h = _mm256_min_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1));
    __m128 m = _mm_min_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  static V finite_or(V x, V fill, int64_t* bad) {
    const __mmask16 fin = _mm512_cmp_ps_mask(_mm512_sub_ps(x, x), _mm512_setzero_ps(), _CMP_EQ_OQ);
    if (bad) *bad += 16 - __builtin_popcount(static_cast<unsigned>(fin));
    return _mm512_mask_blend_ps(fin, fill, x);
  }
  // a = m * 2^k, m in [0.75, 1.5) for a > 0: getmant/getexp handle subnormals.
  static V split_exp(V a, V* k) {
    const V m = _mm512_getmant_ps(a, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_zero);
    const V e = _mm512_getexp_ps(a);  // floor(log2 a)
    // getmant halved mantissas >= 1.5 into [0.75, 1): the exponent goes up by one.
    *k = _mm512_mask_add_ps(e, _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.0f), _CMP_LT_OQ), e,
                            _mm512_set1_ps(1.0f));
    return m;
  }
  // r * 2^n for integer-valued n; scalef handles underflow/overflow exactly.
  static V scale_pow2(V r, V n) { return _mm512_scalef_ps(r, n); }
  static V select_pos(V a, V r) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_GT_OQ), r);
  }
  // Two groups of 8 codes (`bits` < 16, not 8) per step, as in the AVX2 file:
  // the low 256 bits hold the first group's 16-byte window twice, the high
  // 256 bits the second's; lane j takes the 3 bytes holding its code, shifts
  // by (j*bits) % 8 and masks.  An odd last group is left to the caller.
  static int64_t unpack_groups(const uint8_t* p, int64_t groups, int bits, uint16_t* out) {
    if (bits >= 16 || bits == 8) return 0;
    alignas(64) int8_t shuf[64];
    alignas(64) int32_t shift[16];
    for (int j = 0; j < 16; ++j) {
      const int bit = (j & 7) * bits;
      shift[j] = bit & 7;
      for (int t = 0; t < 4; ++t) shuf[4 * j + t] = static_cast<int8_t>(t < 3 ? (bit >> 3) + t : -128);
    }
    const __m512i s = _mm512_load_si512(shuf);
    const __m512i sh = _mm512_load_si512(shift);
    const __m512i mask = _mm512_set1_epi32((1 << bits) - 1);
    int64_t g = 0;
    for (; g + 1 < groups; g += 2) {
      const __m256i a = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + g * bits)));
      const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + (g + 1) * bits)));
      const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
      const __m512i c = _mm512_and_si512(_mm512_srlv_epi32(_mm512_shuffle_epi8(v, s), sh), mask);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8 * g), _mm512_cvtepi32_epi16(c));
    }
    return g;
  }
  // Codes as floats for code_dot: one vector = two groups of 8 codes (2 *
  // `bits` bytes), decoded as in unpack_groups (kind 0), by a widening load
  // (kind 8) or from little-endian pairs (kind 16).  window(): bytes a get()
  // may read from p (all of them must lie inside the stream).
  static constexpr bool kDecodes = true;
  // 2- and 4-bit codes by bytes: kLanes bytes, one a lane; field<S> is each lane's bits [S, S + width).
  using I = __m512i;
  static I load_u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static I set1_i(int v) { return _mm512_set1_epi32(v); }
  template <int S>
  static V field(I v, I mask) { return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, S), mask)); }
  struct Codes {
    __m512i s, sh, mask;
    int bits;
    explicit Codes(int b) : bits(b) {
      alignas(64) int8_t shuf[64];
      alignas(64) int32_t shift[16];
      for (int j = 0; j < 16; ++j) {
        const int bit = (j & 7) * b;
        shift[j] = bit & 7;
        for (int t = 0; t < 4; ++t) shuf[4 * j + t] = static_cast<int8_t>(t < 3 ? (bit >> 3) + t : -128);
      }
      s = _mm512_load_si512(shuf);
      sh = _mm512_load_si512(shift);
      mask = _mm512_set1_epi32(b >= 16 ? 0xffff : (1 << b) - 1);
    }
    int64_t window() const { return bits == 8 ? 16 : bits == 16 ? 32 : bits + 16; }
    template <int Kind>
    V get(const uint8_t* p) const {
      if (Kind == 8)
        return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
      if (Kind == 16)
        return _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
      const __m256i a = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + bits)));
      const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
      return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(_mm512_shuffle_epi8(v, s), sh), mask));
    }
  };
};

}  // namespace isa_avx512
}  // namespace mixquant

#define MIXQUANT_ISA_NS isa_avx512
#define MIXQUANT_ISA_TABLE kTableAvx512
#define MIXQUANT_ISA_NAME "avx512"
#include "kernels_impl.h"
