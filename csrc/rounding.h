// The fused AdaRound step: soft-rounded weights, their gradient (with the
// rounding regulariser's) and an Adam update of the rounding variables V, in
// one pass over flat float32 arrays.  Per element (torch's operation order,
// see mixquant/core/reference.py):
//
//   s = sigmoid(V), h = clamp(s * (zeta - gamma) + gamma, 0, 1)
//   w = scale * clamp(floor + h, lo, hi)
//
// and the gradient of  L(w) + coef * sum(1 - |2h - 1|^beta)  with respect to V
// from dL/dw, followed by torch.optim.Adam's update of V.  Like simd.h this
// header holds only plain data and declarations (it is included by files
// compiled with different ISA flags).
#pragma once

#include <cstdint>

#include "simd.h"

namespace mixquant {

// Adam and regulariser constants of one step, already in the form the kernel
// uses (computed by the caller exactly as torch.optim.Adam computes them).
struct RoundingStep {
  float coef;             // regulariser weight lambda (0: no regulariser term)
  float beta;             // regulariser exponent
  float beta_minus_1;     // beta - 1, rounded once from double (torch's pow_backward exponent)
  float lerp_w;           // 1 - beta1 (exp_avg.lerp_(grad, 1 - beta1))
  float beta2;            // exp_avg_sq.mul_(beta2)
  float one_minus_beta2;  // .addcmul_(grad, grad, value=1 - beta2)
  float neg_step;         // -lr / (1 - beta1^t)
  float bc2_sqrt;         // sqrt(1 - beta2^t)
  float eps;
};

// One table per SIMD level; each function is single-threaded over [0, n).
struct RoundingTable {
  // w = soft-rounded weight of V.
  void (*weight)(const float* V, const float* floor_, const float* scale, const float* lo, const float* hi,
                 int64_t n, float* w);
  // Gradient from gw = dL/dw, Adam update of V, m, v in place, then w of the new V.
  void (*step)(float* V, const float* floor_, const float* scale, const float* lo, const float* hi,
               const float* gw, float* m, float* v, const RoundingStep& p, int64_t n, float* w);
};

extern const RoundingTable kRoundingScalar;
#ifdef MIXQUANT_HAVE_AVX2
extern const RoundingTable kRoundingAvx2;
#endif
#ifdef MIXQUANT_HAVE_AVX512
extern const RoundingTable kRoundingAvx512;
#endif

// rounding_ops.cpp (baseline ISA): the calling thread's table, and threaded drivers.
const RoundingTable* current_rounding_table();
void rounding_weight(const float* V, const float* floor_, const float* scale, const float* lo, const float* hi,
                     int64_t n, int num_threads, float* w);
void rounding_step(float* V, const float* floor_, const float* scale, const float* lo, const float* hi,
                   const float* gw, float* m, float* v, const RoundingStep& p, int64_t n, int num_threads,
                   float* w);

}  // namespace mixquant
