// Kernel bodies, written once and compiled once per SIMD level.
//
// Usage (see kernels_scalar.cpp / kernels_avx2.cpp / kernels_avx512.cpp):
//
//   namespace mixquant { namespace isa_avx2 { struct Vec { ... }; } }
//   #define MIXQUANT_ISA_NS isa_avx2
//   #define MIXQUANT_ISA_TABLE kTableAvx2
//   #define MIXQUANT_ISA_NAME "avx2"
//   #include "kernels_impl.h"
//
// `Vec` is a small vector-traits class (lane count L, load/store, arithmetic,
// round-to-nearest-even, horizontal sums, |x|^p).  Everything below lives in
// an anonymous namespace nested in the per-ISA namespace, so nothing compiled
// here with -mavx512* can be merged by the linker with a baseline copy.  For
// the same reason no std:: function templates are used in this file.
//
// No include guard on purpose: each ISA translation unit includes it once.

#if !defined(MIXQUANT_ISA_NS) || !defined(MIXQUANT_ISA_TABLE) || !defined(MIXQUANT_ISA_NAME)
#error "define MIXQUANT_ISA_NS, MIXQUANT_ISA_TABLE and MIXQUANT_ISA_NAME before including kernels_impl.h"
#endif

namespace mixquant {
namespace MIXQUANT_ISA_NS {
namespace {

using V = typename Vec::V;
constexpr int64_t kLanes = Vec::L;
constexpr int64_t kUnroll = 4;
constexpr int64_t kStep = kLanes * kUnroll;
// Elements per cache block.  Each float accumulator lane receives at most
// kBlock / kStep = 64 terms before it is flushed into a double, which bounds
// the float rounding error of a block sum by ~66 ulp (4e-6 relative) even in
// the worst case; typical error is far smaller.  A block is 1 KiB (scalar),
// 8 KiB (AVX2) or 16 KiB (AVX-512): it stays in L1 while all candidates are
// evaluated on it, so the data is streamed from memory exactly once.
constexpr int64_t kBlock = 64 * kStep;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

struct QV {
  V inv, scale, tlo, thi, escale;
};

inline QV broadcast(const QParam& q) {
  QV v;
  v.inv = Vec::set1(q.inv);
  v.scale = Vec::set1(q.scale);
  v.tlo = Vec::set1(q.tlo);
  v.thi = Vec::set1(q.thi);
  v.escale = Vec::set1(q.escale);
  return v;
}

// Clamped, rounded quantization index relative to the zero point:
//   t = clamp(nearbyint(w * inv), -zp, qmax - zp)
// torch computes q = clamp(nearbyint(w * inv) + zp, 0, qmax) and then q - zp.
// Both are bit-identical: nearbyint gives an integer-valued float r; when
// |r| < 2^24 - 65535, r + zp and q - zp are exact, and when |r| is larger the
// value is clamped to the same bound either way.  NaN maps to the lower bound
// in both (x86 max returns its second operand on NaN; the scalar traits mimic
// that).  We multiply by the float reciprocal rather than divide because that
// is exactly torch's formula (inv_scale = 1.0f / scale) and it keeps the
// divider out of the inner loop.
template <bool kClamp = true>
inline V q_index(V w, const QV& q) {
  const V r = Vec::round_ne(Vec::mul(w, q.inv));
  return kClamp ? Vec::min(Vec::max(r, q.tlo), q.thi) : r;
}

// e = w - w_hat, both rounded to float32 exactly like torch (no FMA here: the
// build uses -ffp-contract=off so the compiler cannot fuse mul and sub).
// kClamp = false is only used when the driver has proved that no element of
// the range leaves [tlo, thi] (QParam::clamp), where the clamp is a no-op.
template <bool kClamp = true>
inline V q_error(V w, const QV& q) { return Vec::sub(w, Vec::mul(q_index<kClamp>(w, q), q.scale)); }

// The error as accumulated: multiplied by the power of two q.escale when the
// driver asked for range scaling (exact, see QParam::escale).
template <bool kScaled>
inline V q_error_acc(V w, const QV& q) {
  return kScaled ? Vec::mul(q_error(w, q), q.escale) : q_error(w, q);
}

// Zero-padded vector of the last n < L elements.  Zero is always exactly
// representable on the grid (0 <= zp <= qmax), so padded lanes have error 0
// and contribute nothing to any of the sums below.
inline V load_tail(const float* x, int64_t n) {
  alignas(64) float buf[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) buf[i] = i < n ? x[i] : 0.0f;
  return Vec::load(buf);
}

// Calls fn(xb, nb, tail) for each cache block [xb, xb + nb) of x[0, n), in
// order; tail holds the block's last nb % L elements, zero-padded.
template <class Fn>
inline void for_each_block(const float* x, int64_t n, const Fn& fn) {
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t nb = min64(kBlock, n - b0);
    const float* xb = x + b0;
    const int64_t nvec = nb - nb % kLanes;
    fn(xb, nb, nb > nvec ? load_tail(xb + nvec, nb - nvec) : Vec::zero());
  }
}

// ---------------------------------------------------------------- minmax ----
// Exact path: min/max over finite values only, and the count of NaN/Inf.
void minmax_checked(const float* x, int64_t n, float* lo, float* hi, int64_t* nonfinite) {
  const V pinf = Vec::set1(__builtin_inff());
  const V ninf = Vec::set1(-__builtin_inff());
  V vlo = pinf, vhi = ninf;
  int64_t bad = 0;
  const int64_t n1 = n - n % kLanes;
  for (int64_t i = 0; i < n1; i += kLanes) {
    const V a = Vec::load(x + i);
    vlo = Vec::min(vlo, Vec::finite_or(a, pinf, &bad));
    vhi = Vec::max(vhi, Vec::finite_or(a, ninf, nullptr));
  }
  float l = Vec::hmin(vlo);
  float h = Vec::hmax(vhi);
  for (int64_t i = n1; i < n; ++i) {
    const float v = x[i];
    if (v - v == 0.0f) {  // finite
      l = v < l ? v : l;
      h = v > h ? v : h;
    } else {
      ++bad;
    }
  }
  *lo = l;
  *hi = h;
  *nonfinite = bad;
}

// Fast path for the common all-finite case: plain min/max plus a running sum
// of x - x, which is 0 for finite x and NaN for NaN/Inf, so a single NaN
// test at the end tells whether the exact path must recount.
void k_minmax(const float* x, int64_t n, float* lo, float* hi, int64_t* nonfinite) {
  const V pinf = Vec::set1(__builtin_inff());
  const V ninf = Vec::set1(-__builtin_inff());
  V vlo0 = pinf, vlo1 = pinf, vhi0 = ninf, vhi1 = ninf;
  V nan0 = Vec::zero(), nan1 = Vec::zero();
  const int64_t n2 = n - n % (2 * kLanes);
  const int64_t n1 = n - n % kLanes;
  for (int64_t i = 0; i < n2; i += 2 * kLanes) {
    const V a = Vec::load(x + i);
    const V b = Vec::load(x + i + kLanes);
    vlo0 = Vec::min(vlo0, a);
    vhi0 = Vec::max(vhi0, a);
    nan0 = Vec::add(nan0, Vec::sub(a, a));
    vlo1 = Vec::min(vlo1, b);
    vhi1 = Vec::max(vhi1, b);
    nan1 = Vec::add(nan1, Vec::sub(b, b));
  }
  if (n1 > n2) {
    const V a = Vec::load(x + n2);
    vlo0 = Vec::min(vlo0, a);
    vhi0 = Vec::max(vhi0, a);
    nan0 = Vec::add(nan0, Vec::sub(a, a));
  }
  float l = Vec::hmin(Vec::min(vlo0, vlo1));
  float h = Vec::hmax(Vec::max(vhi0, vhi1));
  float z = static_cast<float>(Vec::hsum(Vec::add(nan0, nan1)));
  for (int64_t i = n1; i < n; ++i) {
    const float v = x[i];
    z += v - v;
    l = v < l ? v : l;
    h = v > h ? v : h;
  }
  if (z != 0.0f) {  // NaN: some value is not finite
    minmax_checked(x, n, lo, hi, nonfinite);
    return;
  }
  *lo = l;
  *hi = h;
  *nonfinite = 0;
}

// ------------------------------------------------------------ error stats ----
// Sum of squares (of range-scaled errors) and max |e| of one block for one
// parameter set.
template <bool kScaled, bool kClamp>
void err_block(const float* xb, int64_t nb, V tail, const QV& q, double* sse, float* maxabs) {
  const int64_t nfull = nb - nb % kStep;
  const int64_t nvec = nb - nb % kLanes;
  V s0 = Vec::zero(), s1 = Vec::zero(), s2 = Vec::zero(), s3 = Vec::zero();
  V m0 = Vec::zero(), m1 = Vec::zero(), m2 = Vec::zero(), m3 = Vec::zero();
  for (int64_t i = 0; i < nfull; i += kStep) {
    const V e0 = q_error<kClamp>(Vec::load(xb + i), q);
    const V e1 = q_error<kClamp>(Vec::load(xb + i + kLanes), q);
    const V e2 = q_error<kClamp>(Vec::load(xb + i + 2 * kLanes), q);
    const V e3 = q_error<kClamp>(Vec::load(xb + i + 3 * kLanes), q);
    m0 = Vec::absmax(m0, e0);
    m1 = Vec::absmax(m1, e1);
    m2 = Vec::absmax(m2, e2);
    m3 = Vec::absmax(m3, e3);
    const V f0 = kScaled ? Vec::mul(e0, q.escale) : e0;
    const V f1 = kScaled ? Vec::mul(e1, q.escale) : e1;
    const V f2 = kScaled ? Vec::mul(e2, q.escale) : e2;
    const V f3 = kScaled ? Vec::mul(e3, q.escale) : e3;
    s0 = Vec::fmadd(f0, f0, s0);
    s1 = Vec::fmadd(f1, f1, s1);
    s2 = Vec::fmadd(f2, f2, s2);
    s3 = Vec::fmadd(f3, f3, s3);
  }
  for (int64_t i = nfull; i < nvec + (nb > nvec ? kLanes : 0); i += kLanes) {
    const V e = q_error<kClamp>(i < nvec ? Vec::load(xb + i) : tail, q);
    m0 = Vec::absmax(m0, e);
    const V f = kScaled ? Vec::mul(e, q.escale) : e;
    s0 = Vec::fmadd(f, f, s0);
  }
  *sse += Vec::hsum(Vec::add(Vec::add(s0, s1), Vec::add(s2, s3)));
  const float mb = Vec::hmax(Vec::max(Vec::max(m0, m1), Vec::max(m2, m3)));
  *maxabs = mb > *maxabs ? mb : *maxabs;
}

// Sum of (w * escale)^2 over one block: the tensor's energy, range-scaled
// like the errors.
template <bool kScaled>
double sq_block(const float* xb, int64_t nb, V tail, V escale) {
  const int64_t nfull = nb - nb % kStep;
  const int64_t nvec = nb - nb % kLanes;
  V s0 = Vec::zero(), s1 = Vec::zero(), s2 = Vec::zero(), s3 = Vec::zero();
  for (int64_t i = 0; i < nfull; i += kStep) {
    V w0 = Vec::load(xb + i), w1 = Vec::load(xb + i + kLanes);
    V w2 = Vec::load(xb + i + 2 * kLanes), w3 = Vec::load(xb + i + 3 * kLanes);
    if (kScaled) {
      w0 = Vec::mul(w0, escale);
      w1 = Vec::mul(w1, escale);
      w2 = Vec::mul(w2, escale);
      w3 = Vec::mul(w3, escale);
    }
    s0 = Vec::fmadd(w0, w0, s0);
    s1 = Vec::fmadd(w1, w1, s1);
    s2 = Vec::fmadd(w2, w2, s2);
    s3 = Vec::fmadd(w3, w3, s3);
  }
  for (int64_t i = nfull; i < nvec + (nb > nvec ? kLanes : 0); i += kLanes) {
    V w = i < nvec ? Vec::load(xb + i) : tail;
    if (kScaled) w = Vec::mul(w, escale);
    s0 = Vec::fmadd(w, w, s0);
  }
  return Vec::hsum(Vec::add(Vec::add(s0, s1), Vec::add(s2, s3)));
}

// Single pass over memory: each L1-sized block is loaded from memory once and
// reused from cache for all m parameter sets (bit-widths) and the energy.
void k_err_stats(const float* x, int64_t n, const QParam* qp, int64_t m, double* sse,
                 float* maxabs, float energy_escale, double* energy, const float* pf,
                 int64_t pf_n) {
  for (int64_t j = 0; j < m; ++j) {
    sse[j] = 0.0;
    maxabs[j] = 0.0f;
  }
  if (energy) *energy = 0.0;
  const V es = Vec::set1(energy_escale);
  // Prefetch: the lines of pf spread evenly over the (block, candidate) steps.
  const char* pf_at = reinterpret_cast<const char*>(pf);
  const char* pf_end = pf ? pf_at + pf_n * static_cast<int64_t>(sizeof(float)) : pf_at;
  const int64_t steps = ((n + kBlock - 1) / kBlock) * (m > 0 ? m : 1);
  const int64_t pf_per_step = (pf_end - pf_at + 64 * steps - 1) / (64 * steps);
  for_each_block(x, n, [&](const float* xb, int64_t nb, V tail) {
    for (int64_t j = 0; j < m; ++j) {
      for (int64_t k = 0; k < pf_per_step && pf_at < pf_end; ++k, pf_at += 64)
        __builtin_prefetch(pf_at, 0, 2);  // prefetcht1: into L2, not over this row in L1
      const QV q = broadcast(qp[j]);
      const bool scaled = qp[j].escale != 1.0f;
      if (qp[j].clamp) {
        if (scaled) err_block<true, true>(xb, nb, tail, q, sse + j, maxabs + j);
        else err_block<false, true>(xb, nb, tail, q, sse + j, maxabs + j);
      } else {
        if (scaled) err_block<true, false>(xb, nb, tail, q, sse + j, maxabs + j);
        else err_block<false, false>(xb, nb, tail, q, sse + j, maxabs + j);
      }
    }
    if (energy)
      *energy += energy_escale == 1.0f ? sq_block<false>(xb, nb, tail, es) : sq_block<true>(xb, nb, tail, es);
  });
}

// ------------------------------------------------------- weighted errors ----
// Sum of v * e^2 over one block for one parameter set: e range-scaled as in
// err_block, the weights v multiplied by vs (a power of two chosen by the
// driver so that v * vs <= 1).  Zero-padded tails contribute nothing.
template <bool kScaled>
double wsse_block(const float* xb, const float* vb, int64_t nb, V xtail, V vtail, const QV& q, V vs) {
  const int64_t nfull = nb - nb % kStep;
  const int64_t nvec = nb - nb % kLanes;
  V s0 = Vec::zero(), s1 = Vec::zero(), s2 = Vec::zero(), s3 = Vec::zero();
  for (int64_t i = 0; i < nfull; i += kStep) {
    const V e0 = q_error_acc<kScaled>(Vec::load(xb + i), q);
    const V e1 = q_error_acc<kScaled>(Vec::load(xb + i + kLanes), q);
    const V e2 = q_error_acc<kScaled>(Vec::load(xb + i + 2 * kLanes), q);
    const V e3 = q_error_acc<kScaled>(Vec::load(xb + i + 3 * kLanes), q);
    s0 = Vec::fmadd(Vec::mul(Vec::mul(Vec::load(vb + i), vs), e0), e0, s0);
    s1 = Vec::fmadd(Vec::mul(Vec::mul(Vec::load(vb + i + kLanes), vs), e1), e1, s1);
    s2 = Vec::fmadd(Vec::mul(Vec::mul(Vec::load(vb + i + 2 * kLanes), vs), e2), e2, s2);
    s3 = Vec::fmadd(Vec::mul(Vec::mul(Vec::load(vb + i + 3 * kLanes), vs), e3), e3, s3);
  }
  for (int64_t i = nfull; i < nvec + (nb > nvec ? kLanes : 0); i += kLanes) {
    const bool full = i < nvec;
    const V e = q_error_acc<kScaled>(full ? Vec::load(xb + i) : xtail, q);
    const V v = Vec::mul(full ? Vec::load(vb + i) : vtail, vs);
    s0 = Vec::fmadd(Vec::mul(v, e), e, s0);
  }
  return Vec::hsum(Vec::add(Vec::add(s0, s1), Vec::add(s2, s3)));
}

// One pass over x and v: each block of both is loaded once and reused from
// cache for all m parameter sets (bit-widths).
void k_wsse(const float* x, const float* v, int64_t n, const QParam* qp, int64_t m, float vscale,
            double* out) {
  for (int64_t j = 0; j < m; ++j) out[j] = 0.0;
  const V vs = Vec::set1(vscale);
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t nb = min64(kBlock, n - b0);
    const int64_t nvec = nb - nb % kLanes;
    const float* xb = x + b0;
    const float* vb = v + b0;
    const V xtail = nb > nvec ? load_tail(xb + nvec, nb - nvec) : Vec::zero();
    const V vtail = nb > nvec ? load_tail(vb + nvec, nb - nvec) : Vec::zero();
    for (int64_t j = 0; j < m; ++j) {
      const QV q = broadcast(qp[j]);
      out[j] += qp[j].escale != 1.0f ? wsse_block<true>(xb, vb, nb, xtail, vtail, q, vs)
                                     : wsse_block<false>(xb, vb, nb, xtail, vtail, q, vs);
    }
  }
}

// ------------------------------------------------------------- lp errors ----
struct PowSquare {
  V acc(V a, V e) const { return Vec::fmadd(e, e, a); }
};
struct PowAbs {
  V acc(V a, V e) const { return Vec::add(a, Vec::abs(e)); }
};
// |e|^p for general p > 0, vectorised: |e|^p = 2^(p * log2|e|).
//  * |e| = m * 2^k with m in [0.75, 1.5); log2(m) = u * P(u), u = m - 1, P a
//    degree-8 least-squares-minimax fit (max abs error 9e-8 in float math).
//  * y = p * (k + log2 m) with p = p_hi + p_lo (float pair); p_hi * k is
//    split exactly (FMA two-product) and p_lo * k kept, so y carries ~1e-7
//    absolute error even when |y| is large (tiny errors at high bit-widths).
//  * 2^y = 2^n * 2^f, n = round(y), f in [-0.5, 0.5]: degree-6 fit (max
//    relative error 1.1e-7), then an exact scaling by 2^n.
// Per-term relative error is a few 1e-7, without systematic sign, so sums
// agree with torch.abs(e).double().pow(p).sum() within rtol 1e-5 (the float
// block accumulation adds at most ~4e-6, see kBlock).  |e| == 0 gives 0.
// Terms below FLT_MIN lose relative accuracy (they are negligible unless all
// errors are that small).
struct PowC {
  V p_hi, p_lo;
};

inline PowC make_pow(double p) {
  const float hi = static_cast<float>(p);
  PowC c;
  c.p_hi = Vec::set1(hi);
  c.p_lo = Vec::set1(static_cast<float>(p - static_cast<double>(hi)));
  return c;
}

inline V pow_abs(V a, const PowC& c) {
  V k;
  const V u = Vec::sub(Vec::split_exp(a, &k), Vec::set1(1.0f));
  V l = Vec::set1(0.080195874f);
  l = Vec::fmadd(l, u, Vec::set1(-0.1763608f));
  l = Vec::fmadd(l, u, Vec::set1(0.21665879f));
  l = Vec::fmadd(l, u, Vec::set1(-0.2425074f));
  l = Vec::fmadd(l, u, Vec::set1(0.28814006f));
  l = Vec::fmadd(l, u, Vec::set1(-0.36058247f));
  l = Vec::fmadd(l, u, Vec::set1(0.48090357f));
  l = Vec::fmadd(l, u, Vec::set1(-0.7213484f));
  l = Vec::fmadd(l, u, Vec::set1(1.442695f));
  l = Vec::mul(l, u);
  const V yh = Vec::mul(c.p_hi, k);
  V yl = Vec::prod_err(c.p_hi, k, yh);
  yl = Vec::fmadd(c.p_lo, k, yl);
  yl = Vec::fmadd(c.p_hi, l, yl);
  const V n = Vec::round_ne(Vec::add(yh, yl));
  const V f = Vec::add(Vec::sub(yh, n), yl);
  V r = Vec::set1(0.0001548403f);
  r = Vec::fmadd(r, f, Vec::set1(0.0013405901f));
  r = Vec::fmadd(r, f, Vec::set1(0.009617972f));
  r = Vec::fmadd(r, f, Vec::set1(0.05550313f));
  r = Vec::fmadd(r, f, Vec::set1(0.24022652f));
  r = Vec::fmadd(r, f, Vec::set1(0.69314724f));
  r = Vec::fmadd(r, f, Vec::set1(1.0f));
  return Vec::select_pos(a, Vec::scale_pow2(r, n));
}

struct PowGeneral {
  PowC c;
  V acc(V a, V e) const { return Vec::add(a, pow_abs(Vec::abs(e), c)); }
};

// Sum of |scaled e|^p over one block for one candidate: four independent
// accumulators, flushed to double once per block (<= 64 terms per lane).
template <bool kScaled, class Pw>
double lp_block(const float* xb, int64_t nb, V tail, const QV& q, const Pw& pw) {
  const int64_t nfull = nb - nb % kStep;
  const int64_t nvec = nb - nb % kLanes;
  V a0 = Vec::zero(), a1 = Vec::zero(), a2 = Vec::zero(), a3 = Vec::zero();
  for (int64_t i = 0; i < nfull; i += kStep) {
    a0 = pw.acc(a0, q_error_acc<kScaled>(Vec::load(xb + i), q));
    a1 = pw.acc(a1, q_error_acc<kScaled>(Vec::load(xb + i + kLanes), q));
    a2 = pw.acc(a2, q_error_acc<kScaled>(Vec::load(xb + i + 2 * kLanes), q));
    a3 = pw.acc(a3, q_error_acc<kScaled>(Vec::load(xb + i + 3 * kLanes), q));
  }
  for (int64_t i = nfull; i < nvec; i += kLanes) a0 = pw.acc(a0, q_error_acc<kScaled>(Vec::load(xb + i), q));
  if (nb > nvec) a1 = pw.acc(a1, q_error_acc<kScaled>(tail, q));
  return Vec::hsum(Vec::add(Vec::add(a0, a1), Vec::add(a2, a3)));
}

template <class Pw>
void lp_impl(const float* x, int64_t n, const QParam* qp, int64_t m, const Pw& pw,
             double* out) {
  for (int64_t j = 0; j < m; ++j) out[j] = 0.0;
  for_each_block(x, n, [&](const float* xb, int64_t nb, V tail) {
    for (int64_t j = 0; j < m; ++j) {
      const QV q = broadcast(qp[j]);
      out[j] += qp[j].escale == 1.0f ? lp_block<false>(xb, nb, tail, q, pw)
                                     : lp_block<true>(xb, nb, tail, q, pw);
    }
  });
}

void k_lp_err(const float* x, int64_t n, const QParam* qp, int64_t m, double p, double* out) {
  if (p == 2.0) {
    lp_impl(x, n, qp, m, PowSquare{}, out);
  } else if (p == 1.0) {
    lp_impl(x, n, qp, m, PowAbs{}, out);
  } else {
    PowGeneral pw;
    pw.c = make_pow(p);
    lp_impl(x, n, qp, m, pw, out);
  }
}

// ------------------------------------------------------------ elementwise ----
void k_fake_quant(const float* x, int64_t n, const QParam* qp, float* out) {
  const QV q = broadcast(*qp);
  const int64_t nvec = n - n % kLanes;
  for (int64_t i = 0; i < nvec; i += kLanes)
    Vec::store(out + i, Vec::mul(q_index(Vec::load(x + i), q), q.scale));
  if (nvec < n) {
    alignas(64) float buf[kLanes];
    Vec::store(buf, Vec::mul(q_index(load_tail(x + nvec, n - nvec), q), q.scale));
    for (int64_t i = nvec; i < n; ++i) out[i] = buf[i - nvec];
  }
}

template <class T>
void quant_impl(const float* x, int64_t n, const QParam* qp, T* out) {
  const QV q = broadcast(*qp);
  const V zp = Vec::set1(qp->zp);
  const int64_t nvec = n - n % kLanes;
  // t + zp is an exact small integer in [0, qmax].
  for (int64_t i = 0; i < nvec; i += kLanes)
    Vec::store_int(out + i, Vec::add(q_index(Vec::load(x + i), q), zp));
  if (nvec < n) {
    alignas(64) T buf[kLanes];
    Vec::store_int(buf, Vec::add(q_index(load_tail(x + nvec, n - nvec), q), zp));
    for (int64_t i = nvec; i < n; ++i) out[i] = buf[i - nvec];
  }
}

void k_quant_u8(const float* x, int64_t n, const QParam* qp, uint8_t* out) {
  quant_impl(x, n, qp, out);
}
void k_quant_u16(const float* x, int64_t n, const QParam* qp, uint16_t* out) {
  quant_impl(x, n, qp, out);
}

// w = (q - zp) * scale; q - zp is an exact integer in float.
template <class T>
void dequant_impl(const T* c, int64_t n, const QParam* qp, float* out) {
  const V zp = Vec::set1(qp->zp);
  const V scale = Vec::set1(qp->scale);
  const int64_t nvec = n - n % kLanes;
  for (int64_t i = 0; i < nvec; i += kLanes)
    Vec::store(out + i, Vec::mul(Vec::sub(Vec::load_int(c + i), zp), scale));
  if (nvec < n) {
    alignas(64) T in[kLanes];
    alignas(64) float buf[kLanes];
    for (int64_t i = 0; i < kLanes; ++i) in[i] = nvec + i < n ? c[nvec + i] : T(0);
    Vec::store(buf, Vec::mul(Vec::sub(Vec::load_int(in), zp), scale));
    for (int64_t i = nvec; i < n; ++i) out[i] = buf[i - nvec];
  }
}

void k_dequant_u8(const uint8_t* c, int64_t n, const QParam* qp, float* out) {
  dequant_impl(c, n, qp, out);
}
void k_dequant_u16(const uint16_t* c, int64_t n, const QParam* qp, float* out) {
  dequant_impl(c, n, qp, out);
}

// ----------------------------------------------------------------- unpack ----
// Codes come in groups of 8, one group = `bits` whole bytes.  Vec::unpack_groups
// decodes the first groups with SIMD (each reads a 16-byte window, so only
// groups whose window ends inside the stream are handed to it) and returns
// how many it did; the rest, and the widths it does not handle, go through
// a 64-bit bit accumulator that reads each byte once and never past the end.
void k_unpack_u16(const uint8_t* p, int64_t n, int bits, uint16_t* out) {
  if (bits == 8) {
    for (int64_t i = 0; i < n; ++i) out[i] = p[i];
    return;
  }
  if (bits == 16) {  // little-endian pairs, whatever the host's byte order
    for (int64_t i = 0; i < n; ++i)
      out[i] = static_cast<uint16_t>(p[2 * i] | (static_cast<uint16_t>(p[2 * i + 1]) << 8));
    return;
  }
  const int64_t nbytes = (n * bits + 7) / 8;
  int64_t safe = nbytes >= 16 ? (nbytes - 16) / bits + 1 : 0;
  if (safe > n / 8) safe = n / 8;
  const int64_t done = 8 * Vec::unpack_groups(p, safe, bits, out);
  const uint8_t* q = p + done / 8 * bits;
  const uint64_t mask = (uint64_t{1} << bits) - 1;
  uint64_t acc = 0;
  int have = 0;
  for (int64_t i = done; i < n; ++i) {
    while (have < bits) {
      acc |= static_cast<uint64_t>(*q++) << have;
      have += 8;
    }
    out[i] = static_cast<uint16_t>(acc & mask);
    acc >>= bits;
    have -= bits;
  }
}

// --------------------------------------------------------------- code dot ----
// sum code_j * x_j straight from the bit stream: codes become floats in
// registers and are multiplied into float32 partial sums; no weight is formed.
// Every partial sum (a vector lane, or one of the four scalar ones) takes at
// most kDotTerms terms before it is added into a double, so each carries at
// most 64 roundings whatever the level or the length (the bound the tests hold).

// Codes [i, i + n) one by one through a 64-bit bit accumulator: reads each
// byte once, in order, and none past the last one holding a needed bit.
template <int NX>
void dot_stream(const uint8_t* p, int64_t i, int64_t n, int bits, const float* x, int64_t ldx, double* out) {
  if (n <= 0) return;
  const uint64_t bit0 = static_cast<uint64_t>(i) * static_cast<uint64_t>(bits);
  const uint8_t* q = p + bit0 / 8;
  const int skip = static_cast<int>(bit0 % 8);
  uint64_t acc = static_cast<uint64_t>(*q++) >> skip;
  int have = 8 - skip;
  const uint64_t mask = (uint64_t{1} << bits) - 1;
  constexpr int64_t kChunk = 4 * kDotTerms;  // four scalar partial sums per row
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int64_t j1 = min64(n, j0 + kChunk);
    float part[NX][4];
    for (int r = 0; r < NX; ++r)
      for (int u = 0; u < 4; ++u) part[r][u] = 0.0f;
    for (int64_t j = j0; j < j1; ++j) {
      while (have < bits) {
        acc |= static_cast<uint64_t>(*q++) << have;
        have += 8;
      }
      const float c = static_cast<float>(acc & mask);
      acc >>= bits;
      have -= bits;
      for (int r = 0; r < NX; ++r) part[r][j & 3] += c * x[r * ldx + j];
    }
    for (int r = 0; r < NX; ++r)
      out[r] += (static_cast<double>(part[r][0]) + static_cast<double>(part[r][1])) +
                (static_cast<double>(part[r][2]) + static_cast<double>(part[r][3]));
  }
}

// `steps` vectors of kLanes codes from q (byte-aligned, every get() window
// inside the stream), two accumulators per row, flushed every kDotTerms steps each.
template <int NX, int Kind>
void dot_vec(const typename Vec::Codes& d, const uint8_t* q, int64_t steps, int64_t step_bytes, const float* x,
             int64_t ldx, double* out) {
  for (int64_t s0 = 0; s0 < steps; s0 += 2 * kDotTerms) {
    const int64_t s1 = min64(steps, s0 + 2 * kDotTerms);
    V a0[NX], a1[NX];
    for (int r = 0; r < NX; ++r) a0[r] = a1[r] = Vec::zero();
    int64_t s = s0;
    for (; s + 1 < s1; s += 2) {
      const V c0 = d.template get<Kind>(q + s * step_bytes);
      const V c1 = d.template get<Kind>(q + (s + 1) * step_bytes);
      for (int r = 0; r < NX; ++r) {
        a0[r] = Vec::fmadd(c0, Vec::load(x + r * ldx + s * kLanes), a0[r]);
        a1[r] = Vec::fmadd(c1, Vec::load(x + r * ldx + (s + 1) * kLanes), a1[r]);
      }
    }
    if (s < s1) {
      const V c0 = d.template get<Kind>(q + s * step_bytes);
      for (int r = 0; r < NX; ++r) a0[r] = Vec::fmadd(c0, Vec::load(x + r * ldx + s * kLanes), a0[r]);
    }
    for (int r = 0; r < NX; ++r) out[r] += Vec::hsum(a0[r]) + Vec::hsum(a1[r]);
  }
}

template <int NX>
void code_dot_row(const typename Vec::Codes& d, const uint8_t* p, const uint8_t* end, int64_t i0, int64_t n,
                  int64_t block, int bits, const float* x, int64_t ldx, double* out) {
  const int64_t kind = bits == 8 ? 8 : bits == 16 ? 16 : 0;
  const int64_t window = d.window();
  const int64_t step_bytes = kLanes / 8 * bits;  // kLanes codes, a whole number of 8-code groups
  for (int64_t b = 0, j = 0; j < n; ++b) {
    double* o = out + b * NX;
    for (int r = 0; r < NX; ++r) o[r] = 0.0;
    const int64_t je = min64(n, j + block);
    if constexpr (Vec::kDecodes) {
      // Head: codes up to the next one that starts a byte (a multiple of 8 in the stream).
      const int64_t ja = min64(je, (i0 + j + 7) / 8 * 8 - i0);
      dot_stream<NX>(p, i0 + j, ja - j, bits, x + j, ldx, o);
      j = ja;
      const uint8_t* q = p + static_cast<int64_t>(static_cast<uint64_t>(i0 + j) / 8 * static_cast<uint64_t>(bits));
      const int64_t left = end - q;
      const int64_t safe = left >= window ? (left - window) / step_bytes + 1 : 0;
      const int64_t steps = min64((je - j) / kLanes, safe);
      if (kind == 8) dot_vec<NX, 8>(d, q, steps, step_bytes, x + j, ldx, o);
      else if (kind == 16) dot_vec<NX, 16>(d, q, steps, step_bytes, x + j, ldx, o);
      else dot_vec<NX, 0>(d, q, steps, step_bytes, x + j, ldx, o);
      j += steps * kLanes;
    }
    dot_stream<NX>(p, i0 + j, je - j, bits, x + j, ldx, o);
    j = je;
  }
}

// 2- and 4-bit codes never straddle a byte: a vector of kLanes bytes holds P =
// 8 / bits codes a lane, lane j's t-th being code j * P + t of the chunk of
// kLanes * P codes.  Against x permuted once per call the same way
// (xp[(s * P + t) * kLanes + j] = x[s * kLanes * P + j * P + t]) every code is one
// shift, mask and conversion from its product.  One accumulator per (row, t):
// each takes one term a chunk, flushed every kDotTerms chunks.
template <int NX, int P>
void dot_bytes(const uint8_t* q, int64_t chunks, const float* xp, int64_t ldxp, double* out) {
  constexpr int B = 8 / P;
  const typename Vec::I mask = Vec::set1_i((1 << B) - 1);
  for (int64_t s0 = 0; s0 < chunks; s0 += kDotTerms) {
    const int64_t s1 = min64(chunks, s0 + kDotTerms);
    V a[NX][4];
    for (int r = 0; r < NX; ++r)
      for (int t = 0; t < 4; ++t) a[r][t] = Vec::zero();
    for (int64_t s = s0; s < s1; ++s) {
      const typename Vec::I v = Vec::load_u8(q + s * kLanes);
      const float* xs = xp + s * P * kLanes;
#define MIXQUANT_FIELD(T)                                                              \
      if constexpr (T < P) {                                                           \
        const V c = Vec::template field<T * B>(v, mask);                               \
        for (int r = 0; r < NX; ++r)                                                   \
          a[r][T] = Vec::fmadd(c, Vec::load(xs + r * ldxp + T * kLanes), a[r][T]);      \
      }
      MIXQUANT_FIELD(0)
      MIXQUANT_FIELD(1)
      MIXQUANT_FIELD(2)
      MIXQUANT_FIELD(3)
#undef MIXQUANT_FIELD
    }
    for (int r = 0; r < NX; ++r)
      for (int t = 0; t < P; ++t) out[r] += Vec::hsum(a[r][t]);
  }
}

// The rows of one code_dot call by dot_bytes when they allow it (2 or 4 bits,
// one block a row, every row starting on a byte); false otherwise.
template <int NX>
bool code_dot_bytes(const typename Vec::Codes& d, const uint8_t* p, const uint8_t* end, int64_t i0, int64_t m,
                    int64_t n, int64_t block, int bits, const float* x, int64_t ldx, float* perm, int* ready,
                    double* out) {
  if constexpr (!Vec::kDecodes) {
    return false;
  } else {
    const int64_t P = bits == 4 ? 2 : bits == 2 ? 4 : 0;
    if (P == 0 || block < n || i0 % P != 0 || n % P != 0 || n < kLanes * P) return false;
    const int64_t chunks = n / (kLanes * P), done = chunks * kLanes * P;
    if (!*ready) {  // NX rows of `done` permuted values, kept by the caller for its next calls
      for (int r = 0; r < NX; ++r)
        for (int64_t s = 0; s < chunks; ++s)
          for (int64_t t = 0; t < P; ++t)
            for (int64_t j = 0; j < kLanes; ++j)
              perm[r * done + (s * P + t) * kLanes + j] = x[r * ldx + s * kLanes * P + j * P + t];
      *ready = 1;
    }
    for (int64_t q = 0; q < m; ++q) {
      const int64_t row = i0 + q * n;
      double* o = out + q * NX;
      for (int r = 0; r < NX; ++r) o[r] = 0.0;
      if (P == 2) dot_bytes<NX, 2>(p + row / 2, chunks, perm, done, o);
      else dot_bytes<NX, 4>(p + row / 4, chunks, perm, done, o);
      double rest[NX] = {};
      code_dot_row<NX>(d, p, end, row + done, n - done, n - done > 0 ? n - done : 1, bits, x + done, ldx, rest);
      for (int r = 0; r < NX; ++r) o[r] += rest[r];
    }
    return true;
  }
}

template <int NX>
void code_dot_nx(const uint8_t* p, const uint8_t* end, int64_t i0, int64_t m, int64_t n, int64_t block, int bits,
                 const float* x, int64_t ldx, float* xbuf, int* xready, double* out) {
  const typename Vec::Codes d(bits);  // once per call: its tables cost as much as a short row
  if (code_dot_bytes<NX>(d, p, end, i0, m, n, block, bits, x, ldx, xbuf, xready, out)) return;
  const int64_t nb = (n + block - 1) / block;
  for (int64_t q = 0; q < m; ++q) code_dot_row<NX>(d, p, end, i0 + q * n, n, block, bits, x, ldx, out + q * nb * NX);
}

void k_code_dot(const uint8_t* p, const uint8_t* end, int64_t i0, int64_t m, int64_t n, int64_t block, int bits,
                const float* x, int64_t ldx, int64_t nx, float* xbuf, int* xready, double* out) {
  switch (nx) {
    case 1: code_dot_nx<1>(p, end, i0, m, n, block, bits, x, ldx, xbuf, xready, out); break;
    case 2: code_dot_nx<2>(p, end, i0, m, n, block, bits, x, ldx, xbuf, xready, out); break;
    case 3: code_dot_nx<3>(p, end, i0, m, n, block, bits, x, ldx, xbuf, xready, out); break;
    default: code_dot_nx<4>(p, end, i0, m, n, block, bits, x, ldx, xbuf, xready, out); break;
  }
}

}  // namespace
}  // namespace MIXQUANT_ISA_NS

// The only symbol with linkage: this ISA's table.  It is constant-initialized
// (an aggregate of function addresses), so no code compiled with this TU's
// ISA flags runs at load time on a CPU that may lack the ISA.
extern const KernelTable MIXQUANT_ISA_TABLE;
const KernelTable MIXQUANT_ISA_TABLE = {
    MIXQUANT_ISA_NAME,
    &MIXQUANT_ISA_NS::k_minmax,
    &MIXQUANT_ISA_NS::k_err_stats,
    &MIXQUANT_ISA_NS::k_lp_err,
    &MIXQUANT_ISA_NS::k_wsse,
    &MIXQUANT_ISA_NS::k_fake_quant,
    &MIXQUANT_ISA_NS::k_quant_u8,
    &MIXQUANT_ISA_NS::k_quant_u16,
    &MIXQUANT_ISA_NS::k_dequant_u8,
    &MIXQUANT_ISA_NS::k_dequant_u16,
    &MIXQUANT_ISA_NS::k_unpack_u16,
    &MIXQUANT_ISA_NS::k_code_dot,
};

}  // namespace mixquant
