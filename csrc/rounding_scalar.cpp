// Portable build of the fused AdaRound step (one lane; baseline flags only).
#include <cmath>
#include <cstdint>
#include <cstring>

#include "rounding.h"
#include "round_even.h"

namespace mixquant {
namespace rnd_scalar {

struct RVec {
  using V = float;
  using M = bool;
  static constexpr int64_t L = 1;
  static V load(const float* p) { return *p; }
  static void store(float* p, V v) { *p = v; }
  static V set1(float v) { return v; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V div(V a, V b) { return a / b; }
  static V sqrt(V a) { return std::sqrt(a); }
  static V abs(V a) { return std::fabs(a); }
  // x86 minps/maxps semantics (the second operand on NaN), as in the SIMD files.
  static V min(V a, V b) { return a < b ? a : b; }
  static V max(V a, V b) { return a > b ? a : b; }
  static V round_ne(V x) { return round_even(x); }
  // a * b - p exactly: the product of two floats is exact in double.
  static V prod_err(V a, V b, V p) {
    return static_cast<float>(static_cast<double>(a) * static_cast<double>(b) - static_cast<double>(p));
  }
  static M ge(V a, V b) { return a >= b; }
  static M le(V a, V b) { return a <= b; }
  static M gt(V a, V b) { return a > b; }
  static M lt(V a, V b) { return a < b; }
  static M mand(M a, M b) { return a && b; }
  static V blend(M m, V a, V b) { return m ? a : b; }
  static uint32_t bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
  }
  static float from_bits(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  // 2^n for integer-valued n in [-126, 127].
  static V pow2i(V n) { return from_bits(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23); }
  // a = m * 2^k with m in [0.75, 1.5), for normal a > 0 (anything else gives a finite m, k).
  static V split_exp(V a, V* k) {
    const uint32_t b = bits(a);
    const int32_t t = static_cast<int32_t>(b - 0x3f400000u);
    *k = static_cast<float>(t >> 23);
    return from_bits(b - (static_cast<uint32_t>(t) & 0xff800000u));
  }
};

}  // namespace rnd_scalar
}  // namespace mixquant

#define MIXQUANT_RND_NS rnd_scalar
#define MIXQUANT_RND_TABLE kRoundingScalar
#include "rounding_impl.h"
