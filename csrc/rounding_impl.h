// Body of the fused AdaRound step (rounding.h), written once and compiled once
// per SIMD level, like kernels_impl.h.  The including file defines, in its
// per-ISA namespace, a traits struct `RVec` (lane count L, vector type V, mask
// type M, IEEE arithmetic, comparisons, blend, round-to-nearest-even, exact
// product error, and 2^n for integer n) and then:
//
//   #define MIXQUANT_RND_NS isa_avx2
//   #define MIXQUANT_RND_TABLE kRoundingAvx2
//   #include "rounding_impl.h"
//
// Only correctly rounded IEEE operations are used (no FMA contraction: the
// build passes -ffp-contract=off), so every SIMD level gives bit-identical
// results; they differ from torch only through the sigmoid and the power,
// which are computed here with polynomials (relative error ~1e-7 each).

#if !defined(MIXQUANT_RND_NS) || !defined(MIXQUANT_RND_TABLE)
#error "define MIXQUANT_RND_NS and MIXQUANT_RND_TABLE before including rounding_impl.h"
#endif

namespace mixquant {
namespace MIXQUANT_RND_NS {
namespace {

using RV = typename RVec::V;
using RM = typename RVec::M;
constexpr int64_t kRL = RVec::L;

inline RV c(float x) { return RVec::set1(x); }

// 2^y for y in [-126, 126]: y = n + f with n = round(y), |f| <= 1/2; 2^f by a
// degree-6 polynomial fitted to the relative error (8.4e-8 in float Horner).
inline RV exp2_poly(RV yh, RV yl) {
  const RV n = RVec::round_ne(RVec::add(yh, yl));
  const RV f = RVec::add(RVec::sub(yh, n), yl);
  RV r = c(0.00014990888f);
  r = RVec::add(RVec::mul(r, f), c(0.0013393083f));
  r = RVec::add(RVec::mul(r, f), c(0.0096196737f));
  r = RVec::add(RVec::mul(r, f), c(0.055503473f));
  r = RVec::add(RVec::mul(r, f), c(0.24022637f));
  r = RVec::add(RVec::mul(r, f), c(0.69314718f));
  r = RVec::add(RVec::mul(r, f), c(1.0f));
  return RVec::mul(r, RVec::pow2i(n));
}

// 1 / (1 + e^-x); |x| is capped at 80, where float sigmoid is already 0 or 1
// to within 2e-35.  -x * log2(e) is formed as a float pair (exact product
// error), so the exponent carries ~1e-7 relative error even for large |x|.
inline RV sigmoid(RV x) {
  const RV nx = RVec::sub(c(0.0f), RVec::min(RVec::max(x, c(-80.0f)), c(80.0f)));
  const RV l2e_hi = c(1.44269502f), l2e_lo = c(1.925963e-08f);
  const RV yh = RVec::mul(nx, l2e_hi);
  const RV yl = RVec::add(RVec::prod_err(nx, l2e_hi, yh), RVec::mul(nx, l2e_lo));
  return RVec::div(c(1.0f), RVec::add(c(1.0f), exp2_poly(yh, yl)));
}

// a^p for a in [0, 1] and p > 0 (0 for a below FLT_MIN): a = m * 2^k with
// m in [0.75, 1.5), log2(m) = u * P(u), u = m - 1 (degree 8, abs error 1.1e-7),
// then 2^(p * (k + log2 m)) with the exponent clamped at -126.
inline RV pow_unit(RV a, RV p) {
  RV k;
  const RV m = RVec::split_exp(a, &k);
  const RV u = RVec::sub(m, c(1.0f));
  RV l = c(0.074153446f);
  l = RVec::add(RVec::mul(l, u), c(-0.16879089f));
  l = RVec::add(RVec::mul(l, u), c(0.21439384f));
  l = RVec::add(RVec::mul(l, u), c(-0.24299495f));
  l = RVec::add(RVec::mul(l, u), c(0.28840792f));
  l = RVec::add(RVec::mul(l, u), c(-0.36058035f));
  l = RVec::add(RVec::mul(l, u), c(0.48089564f));
  l = RVec::add(RVec::mul(l, u), c(-0.72134835f));
  l = RVec::add(RVec::mul(l, u), c(1.44269502f));
  l = RVec::mul(l, u);
  const RV y = RVec::min(RVec::max(RVec::mul(p, RVec::add(k, l)), c(-126.0f)), c(126.0f));
  return RVec::blend(RVec::ge(a, c(1.17549435e-38f)), exp2_poly(y, c(0.0f)), c(0.0f));
}

struct Consts {
  RV zg = c(1.2f);     // zeta - gamma, as float (torch casts the Python scalar)
  RV gamma = c(-0.1f);
  RV zero = c(0.0f), one = c(1.0f);
};

// h(V) clamped to [0, 1], and the raw value before the clamp.
inline RV soft_h(RV s, const Consts& k, RV* hr) {
  *hr = RVec::add(RVec::mul(s, k.zg), k.gamma);
  return RVec::min(RVec::max(*hr, k.zero), k.one);
}

inline RV weight_of(RV V, RV fl, RV sc, RV lo, RV hi, const Consts& k) {
  RV hr;
  const RV h = soft_h(sigmoid(V), k, &hr);
  return RVec::mul(sc, RVec::min(RVec::max(RVec::add(fl, h), lo), hi));
}

// One vector of the step; returns the new V, updates m and v, writes w.
inline RV step_vec(RV V, RV fl, RV sc, RV lo, RV hi, RV gw, RV* m, RV* v, const RoundingStep& p,
                   const Consts& k, RV* w) {
  const RV s = sigmoid(V);
  RV hr;
  const RV h = soft_h(s, k, &hr);
  const RV q = RVec::add(fl, h);
  // d/dh of L(scale * clamp(floor + h, lo, hi)): the clamp passes the gradient where lo <= q <= hi.
  RV gh = RVec::blend(RVec::mand(RVec::ge(q, lo), RVec::le(q, hi)), RVec::mul(gw, sc), k.zero);
  if (p.coef != 0.0f) {
    // d/dh of coef * (1 - |u|^beta), u = 2h - 1: ((-coef * (|u|^(beta-1) * beta)) * sgn(u)) * 2.
    const RV u = RVec::sub(RVec::mul(h, c(2.0f)), k.one);
    const RV t = RVec::mul(pow_unit(RVec::abs(u), c(p.beta_minus_1)), c(p.beta));
    const RV sg = RVec::blend(RVec::gt(u, k.zero), k.one, RVec::blend(RVec::lt(u, k.zero), c(-1.0f), k.zero));
    gh = RVec::add(gh, RVec::mul(RVec::mul(RVec::mul(c(-p.coef), t), sg), c(2.0f)));
  }
  // through the clamp of h, the * (zeta - gamma), and sigmoid'(V) = (1 - s) * s.
  gh = RVec::blend(RVec::mand(RVec::ge(hr, k.zero), RVec::le(hr, k.one)), gh, k.zero);
  const RV g = RVec::mul(RVec::mul(RVec::mul(gh, k.zg), RVec::sub(k.one, s)), s);
  // torch.optim.Adam (no weight decay, not amsgrad).
  *m = RVec::add(*m, RVec::mul(c(p.lerp_w), RVec::sub(g, *m)));
  *v = RVec::add(RVec::mul(*v, c(p.beta2)), RVec::mul(RVec::mul(c(p.one_minus_beta2), g), g));
  const RV denom = RVec::add(RVec::div(RVec::sqrt(*v), c(p.bc2_sqrt)), c(p.eps));
  const RV nV = RVec::add(V, RVec::mul(c(p.neg_step), RVec::div(*m, denom)));
  *w = weight_of(nV, fl, sc, lo, hi, k);
  return nV;
}

// Padded copy of the last n < L elements (pad values keep every lane finite).
inline RV load_pad(const float* x, int64_t n, float pad) {
  alignas(64) float buf[kRL];
  for (int64_t i = 0; i < kRL; ++i) buf[i] = i < n ? x[i] : pad;
  return RVec::load(buf);
}

inline void store_part(float* x, RV v, int64_t n) {
  alignas(64) float buf[kRL];
  RVec::store(buf, v);
  for (int64_t i = 0; i < n; ++i) x[i] = buf[i];
}

void weight_kernel(const float* V, const float* fl, const float* sc, const float* lo, const float* hi, int64_t n,
                   float* w) {
  const Consts k;
  const int64_t n1 = n - n % kRL;
  for (int64_t i = 0; i < n1; i += kRL)
    RVec::store(w + i, weight_of(RVec::load(V + i), RVec::load(fl + i), RVec::load(sc + i), RVec::load(lo + i),
                                 RVec::load(hi + i), k));
  if (n > n1) {
    const int64_t r = n - n1;
    store_part(w + n1, weight_of(load_pad(V + n1, r, 0.0f), load_pad(fl + n1, r, 0.0f), load_pad(sc + n1, r, 1.0f),
                                 load_pad(lo + n1, r, 0.0f), load_pad(hi + n1, r, 1.0f), k), r);
  }
}

void step_kernel(float* V, const float* fl, const float* sc, const float* lo, const float* hi, const float* gw,
                 float* m, float* v, const RoundingStep& p, int64_t n, float* w) {
  const Consts k;
  const int64_t n1 = n - n % kRL;
  for (int64_t i = 0; i < n1; i += kRL) {
    RV mm = RVec::load(m + i), vv = RVec::load(v + i), ww;
    const RV nV = step_vec(RVec::load(V + i), RVec::load(fl + i), RVec::load(sc + i), RVec::load(lo + i),
                           RVec::load(hi + i), RVec::load(gw + i), &mm, &vv, p, k, &ww);
    RVec::store(V + i, nV);
    RVec::store(m + i, mm);
    RVec::store(v + i, vv);
    RVec::store(w + i, ww);
  }
  if (n > n1) {
    const int64_t r = n - n1;
    RV mm = load_pad(m + n1, r, 0.0f), vv = load_pad(v + n1, r, 0.0f), ww;
    const RV nV = step_vec(load_pad(V + n1, r, 0.0f), load_pad(fl + n1, r, 0.0f), load_pad(sc + n1, r, 1.0f),
                           load_pad(lo + n1, r, 0.0f), load_pad(hi + n1, r, 1.0f), load_pad(gw + n1, r, 0.0f),
                           &mm, &vv, p, k, &ww);
    store_part(V + n1, nV, r);
    store_part(m + n1, mm, r);
    store_part(v + n1, vv, r);
    store_part(w + n1, ww, r);
  }
}

}  // namespace
}  // namespace MIXQUANT_RND_NS

const RoundingTable MIXQUANT_RND_TABLE = {&MIXQUANT_RND_NS::weight_kernel, &MIXQUANT_RND_NS::step_kernel};

}  // namespace mixquant
