// Round half to even without a libm call: (|x| + 2^m) - 2^m rounds to an
// integer in the default rounding mode when |x| < 2^m (m = 23 for float, 52
// for double); larger magnitudes and NaN/Inf are already "rounded".
// Identical to std::nearbyint in the default mode, -0.0 included.
//
// Baseline code only (ops.cpp, kernels_scalar.cpp): an inline function in a
// header included by a file compiled with -mavx2/-mavx512* could be emitted
// with those instructions and kept by the linker for baseline callers.
#pragma once

#include <cmath>

namespace mixquant {

inline float round_even(float x) {
  const float a = std::fabs(x);
  if (!(a < 8388608.0f)) return x;
  return std::copysign((a + 8388608.0f) - 8388608.0f, x);
}

inline double round_even(double x) {
  const double a = std::fabs(x);
  if (!(a < 4503599627370496.0)) return x;
  return std::copysign((a + 4503599627370496.0) - 4503599627370496.0, x);
}

}  // namespace mixquant
