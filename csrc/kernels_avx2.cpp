// AVX2 + FMA kernels.  This is the only file compiled with -mavx2 -mfma.
#include <immintrin.h>

#include <cstdint>

#include "simd.h"

#if !defined(__AVX2__) || !defined(__FMA__)
#error "kernels_avx2.cpp must be compiled with -mavx2 -mfma"
#endif

namespace mixquant {
namespace isa_avx2 {

struct Vec {
  using V = __m256;
  static constexpr int64_t L = 8;

  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V load_int(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static V load_int(const uint16_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // v holds exact integers in [0, 65535]; packus keeps lane order (128-bit halves).
  static __m128i pack_u16(V v) {
    const __m256i i = _mm256_cvtps_epi32(v);
    return _mm_packus_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
  }
  static void store_int(uint16_t* p, V v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), pack_u16(v)); }
  static void store_int(uint8_t* p, V v) {
    const __m128i w = pack_u16(v);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(w, w));
  }
  static V set1(float v) { return _mm256_set1_ps(v); }
  static V zero() { return _mm256_setzero_ps(); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V prod_err(V a, V b, V p) { return _mm256_fmsub_ps(a, b, p); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V round_ne(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V abs(V x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }
  // max(m, |e|) for finite e and m >= 0.
  static V absmax(V m, V e) { return max(m, abs(e)); }
  static double hsum(V x) {
    const __m256d a = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
    const __m256d b = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
    const __m256d s = _mm256_add_pd(a, b);
    __m128d t = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    t = _mm_add_sd(t, _mm_unpackhi_pd(t, t));
    return _mm_cvtsd_f64(t);
  }
  static float hmax(V x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  static float hmin(V x) {
    __m128 m = _mm_min_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  static V finite_or(V x, V fill, int64_t* bad) {
    const V fin = _mm256_cmp_ps(_mm256_sub_ps(x, x), _mm256_setzero_ps(), _CMP_EQ_OQ);
    if (bad) *bad += 8 - __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(fin)));
    return _mm256_blendv_ps(fill, x, fin);
  }
  // a = m * 2^k, m in [0.75, 1.5) for normal a > 0.  Subtracting the bit
  // pattern of 0.75 moves the exponent boundary to 0.75 * 2^k, so one shift
  // gives k and one subtraction rebuilds m.  Subnormal a (< FLT_MIN) is not
  // normalised: its |e|^p term is over-estimated but stays below FLT_MIN^p.
  static V split_exp(V a, V* k) {
    const __m256i off = _mm256_set1_epi32(0x3f400000);  // 0.75f
    const __m256i bits = _mm256_castps_si256(a);
    const __m256i t = _mm256_sub_epi32(bits, off);
    *k = _mm256_cvtepi32_ps(_mm256_srai_epi32(t, 23));
    return _mm256_castsi256_ps(_mm256_sub_epi32(bits, _mm256_and_si256(t, _mm256_set1_epi32(static_cast<int>(0xff800000u)))));
  }
  // r * 2^n for integer-valued n, in two steps so that n in [-252, 254]
  // (subnormal and overflowing results included) is exact.
  static V scale_pow2(V r, V n) {
    n = _mm256_min_ps(_mm256_max_ps(n, _mm256_set1_ps(-252.0f)), _mm256_set1_ps(254.0f));
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i h1 = _mm256_srai_epi32(ni, 1);
    const __m256i h2 = _mm256_sub_epi32(ni, h1);
    const __m256i bias = _mm256_set1_epi32(127);
    const V s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h1, bias), 23));
    const V s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h2, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(r, s1), s2);
  }
  static V select_pos(V a, V r) {
    return _mm256_and_ps(r, _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_GT_OQ));
  }
  // One group of 8 codes (`bits` < 16, not 8) per step: lane j gathers the 3
  // bytes holding bits [j*bits, j*bits + bits) (at most 7 + 15 = 22 bits, byte
  // offsets <= 15) from the group's 16-byte window, shifts by (j*bits) % 8 and
  // masks.  Each group's window must lie inside the stream (the caller's count).
  static int64_t unpack_groups(const uint8_t* p, int64_t groups, int bits, uint16_t* out) {
    if (bits >= 16 || bits == 8) return 0;
    alignas(32) int8_t shuf[32];
    alignas(32) int32_t shift[8];
    for (int j = 0; j < 8; ++j) {
      const int bit = j * bits;
      shift[j] = bit & 7;
      for (int t = 0; t < 4; ++t) shuf[4 * j + t] = static_cast<int8_t>(t < 3 ? (bit >> 3) + t : -128);
    }
    const __m256i s = _mm256_load_si256(reinterpret_cast<const __m256i*>(shuf));
    const __m256i sh = _mm256_load_si256(reinterpret_cast<const __m256i*>(shift));
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
    for (int64_t g = 0; g < groups; ++g) {
      // Both 128-bit halves hold the window: vpshufb indexes within a half.
      const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + g * bits)));
      const __m256i c = _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(v, s), sh), mask);
      // packus interleaves per half: qwords (c0-3, c0-3, c4-7, c4-7) -> take 0 and 2.
      const __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi32(c, c), 0x08);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 8 * g), _mm256_castsi256_si128(w));
    }
    return groups;
  }
  // Codes as floats for code_dot: one vector = one group of 8 codes (`bits`
  // bytes).  Kind 8: a widening load; kind 16: little-endian pairs; kind 0
  // (any other width): the 3-byte gather of unpack_groups.  window(): bytes a
  // get() may read from p (all of them must lie inside the stream).
  static constexpr bool kDecodes = true;
  // 2- and 4-bit codes by bytes: kLanes bytes, one a lane; field<S> is each lane's bits [S, S + width).
  using I = __m256i;
  static I load_u8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
  static I set1_i(int v) { return _mm256_set1_epi32(v); }
  template <int S>
  static V field(I v, I mask) { return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, S), mask)); }
  struct Codes {
    __m256i s, sh, mask;
    int bits;
    explicit Codes(int b) : bits(b) {
      alignas(32) int8_t shuf[32];
      alignas(32) int32_t shift[8];
      for (int j = 0; j < 8; ++j) {
        const int bit = j * b;
        shift[j] = bit & 7;
        for (int t = 0; t < 4; ++t) shuf[4 * j + t] = static_cast<int8_t>(t < 3 ? (bit >> 3) + t : -128);
      }
      s = _mm256_load_si256(reinterpret_cast<const __m256i*>(shuf));
      sh = _mm256_load_si256(reinterpret_cast<const __m256i*>(shift));
      mask = _mm256_set1_epi32(b >= 16 ? 0xffff : (1 << b) - 1);
    }
    int64_t window() const { return bits == 8 ? 8 : 16; }
    template <int Kind>
    V get(const uint8_t* p) const {
      if (Kind == 8)
        return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
      if (Kind == 16)
        return _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
      const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(v, s), sh), mask));
    }
  };
};

}  // namespace isa_avx2
}  // namespace mixquant

#define MIXQUANT_ISA_NS isa_avx2
#define MIXQUANT_ISA_TABLE kTableAvx2
#define MIXQUANT_ISA_NAME "avx2"
#include "kernels_impl.h"
