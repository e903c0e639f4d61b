// Portable kernels (one lane).  Compiled with the baseline flags only, so on
// x86-64 the compiler may still auto-vectorise with SSE2.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "round_even.h"
#include "simd.h"

namespace mixquant {
namespace isa_scalar {

struct Vec {
  using V = float;
  static constexpr int64_t L = 1;

  static V load(const float* p) { return *p; }
  static void store(float* p, V v) { *p = v; }
  static V load_int(const uint8_t* p) { return static_cast<float>(*p); }
  static V load_int(const uint16_t* p) { return static_cast<float>(*p); }
  // v holds an exact integer in [0, qmax].
  static void store_int(uint8_t* p, V v) { *p = static_cast<uint8_t>(static_cast<int32_t>(v)); }
  static void store_int(uint16_t* p, V v) { *p = static_cast<uint16_t>(static_cast<int32_t>(v)); }
  static V set1(float v) { return v; }
  static V zero() { return 0.0f; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  // Only used for accumulation / polynomials, where fusing does not matter.
  static V fmadd(V a, V b, V c) { return a * b + c; }
  // a * b - p exactly (the product of two floats is exact in double).
  static V prod_err(V a, V b, V p) {
    return static_cast<float>(static_cast<double>(a) * static_cast<double>(b) - static_cast<double>(p));
  }
  // Same NaN behaviour as x86 minps/maxps: the second operand is returned.
  static V min(V a, V b) { return a < b ? a : b; }
  static V max(V a, V b) { return a > b ? a : b; }
  // Round half to even (round_even.h; exact, including -0.0 and |x| >= 2^23).
  static V round_ne(V x) { return round_even(x); }
  static V abs(V x) { return std::fabs(x); }
  // max(m, |e|) for finite e and m >= 0.
  static V absmax(V m, V e) { return max(m, abs(e)); }
  static double hsum(V x) { return static_cast<double>(x); }
  static float hmax(V x) { return x; }
  static float hmin(V x) { return x; }
  static V finite_or(V x, V fill, int64_t* bad) {
    if (x - x == 0.0f) return x;
    if (bad) ++*bad;
    return fill;
  }
  // a = m * 2^k, m in [0.75, 1.5) for a > 0 (subnormals pre-scaled by 2^23).
  // Subtracting the bit pattern of 0.75 moves the exponent boundary to
  // 0.75 * 2^k, so one shift gives k and one subtraction rebuilds m.
  static V split_exp(V a, V* k) {
    const bool tiny = a < 0x1p-126f;
    const uint32_t bits = to_bits(tiny ? a * 0x1p23f : a);
    const int32_t t = static_cast<int32_t>(bits - 0x3f400000u);
    *k = static_cast<float>((t >> 23) - (tiny ? 23 : 0));
    return from_bits(bits - (static_cast<uint32_t>(t) & 0xff800000u));
  }
  // r * 2^n for integer-valued n, in two steps so that n in [-252, 254]
  // (subnormal and overflowing results included) is exact.
  static V scale_pow2(V r, V n) {
    const int32_t ni = static_cast<int32_t>(n < -252.0f ? -252.0f : (n > 254.0f ? 254.0f : n));
    const int32_t h1 = ni >> 1, h2 = ni - h1;
    return r * from_bits(static_cast<uint32_t>(h1 + 127) << 23) *
           from_bits(static_cast<uint32_t>(h2 + 127) << 23);
  }
  static uint32_t to_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
  }
  static float from_bits(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static V select_pos(V a, V r) { return a > 0.0f ? r : 0.0f; }
  // No SIMD decoding: the caller's bit accumulator does every group.
  static int64_t unpack_groups(const uint8_t*, int64_t, int, uint16_t*) { return 0; }
  // No SIMD decoding in code_dot either: its bit-stream loop does every code.
  static constexpr bool kDecodes = false;
  using I = uint32_t;
  static I load_u8(const uint8_t* p) { return *p; }
  static I set1_i(int v) { return static_cast<I>(v); }
  template <int S>
  static V field(I v, I mask) { return static_cast<float>((v >> S) & mask); }
  struct Codes {
    explicit Codes(int) {}
    int64_t window() const { return 0; }
    template <int Kind>
    V get(const uint8_t*) const { return 0.0f; }
  };
};

}  // namespace isa_scalar
}  // namespace mixquant

#define MIXQUANT_ISA_NS isa_scalar
#define MIXQUANT_ISA_TABLE kTableScalar
#define MIXQUANT_ISA_NAME "scalar"
#include "kernels_impl.h"
