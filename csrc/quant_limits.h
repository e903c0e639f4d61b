// The quantizer's limits, as the binding checks them.  They mirror
// python/mixquant/core/limits.py; _core.limits() exposes them and a test
// holds the two equal.
#pragma once

#include <cmath>
#include <cstdint>

namespace mixquant {
namespace limits {

constexpr int kMinBits = 1;
constexpr int kMaxBits = 16;
constexpr int kMinActBits = 2;
constexpr int kMaxActBits = 16;
constexpr int64_t kMaxNGrid = 100000;
constexpr int64_t kMaxClipScratchBytes = int64_t{1} << 33;  // 8 GiB

// Every clipping factor 1 - i*step, 0 <= i < n_grid, stays positive.
inline bool clip_grid_ok(int64_t n_grid, double step) {
  return n_grid >= 1 && n_grid <= kMaxNGrid && std::isfinite(step) && step > 0.0 &&
         static_cast<double>(n_grid - 1) * step < 1.0;
}

}  // namespace limits
}  // namespace mixquant
