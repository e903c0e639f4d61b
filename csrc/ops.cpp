// Drivers: parameter math, work partitioning, OpenMP, deterministic reductions.
// Baseline ISA only; the per-ISA kernels are reached through the KernelTable.
#include "ops.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "round_even.h"
#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace mixquant {
namespace {

// Reductions split a group (a row, or the whole matrix for per-tensor
// parameters) into fixed chunks whose size depends only on the group length,
// never on the thread count or on timing.  Every chunk is reduced from zero by
// one kernel call and the chunk results are combined in chunk order, so the
// results are bit-identical for any num_threads.
constexpr int64_t kMinChunk = 32768;   // multiple of every kernel's cache block
constexpr int64_t kMaxChunks = 1024;   // bounds the partial-result buffer
constexpr int64_t kElemChunk = 32768;  // elementwise kernels
// Lead of the software prefetch in minmax_error_table (measured on ResNet
// shapes: no prefetch, or 16 KiB and more, were slower).
constexpr int64_t kPrefetchBytes = 4096;
// Bytes of rows per work item of minmax_error_table (read twice: must stay in L1/L2).
constexpr int64_t kRunBytes = 32768;
// Elements below which a fused per-row call is not worth a second thread.
constexpr int64_t kSmallWork = 8192;

int64_t chunk_size(int64_t len) {
  int64_t ch = (len + kMaxChunks - 1) / kMaxChunks;
  if (ch < kMinChunk) ch = kMinChunk;
  return (ch + kMinChunk - 1) / kMinChunk * kMinChunk;
}

// Per-thread scratch is laid out with this stride (in elements of T) so that
// two threads never write to the same cache line (false sharing cost the
// second thread a good part of its speed on short rows).
template <class T>
int64_t thread_stride(int64_t n) {
  const int64_t per_line = 64 / static_cast<int64_t>(sizeof(T));
  return (n + per_line - 1) / per_line * per_line + per_line;
}

// Groups handed out per OpenMP scheduling step: neighbouring groups write
// neighbouring outputs, so one thread takes a run of up to 16 of them, while
// leaving at least 4 runs per thread for load balance.
int64_t group_run(int64_t groups, int nt) {
  const int64_t run = groups / (4 * static_cast<int64_t>(nt));
  return run < 1 ? 1 : (run > 16 ? 16 : run);
}

int clamp_threads(int num_threads, int64_t work_items) {
  int64_t nt = num_threads < 1 ? 1 : num_threads;
  if (nt > 256) nt = 256;
  if (nt > work_items) nt = work_items < 1 ? 1 : work_items;
#ifndef _OPENMP
  nt = 1;
#endif
  return static_cast<int>(nt);
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Reduce G groups, group g being the L contiguous floats at x + g * L, into
// R doubles per group (out[g * R .. g * R + R)).
//   compute(g, ptr, n, slot, tid): reduce ptr[0..n) from scratch into slot[0..R)
//   combine(acc, part): acc <- acc (+) part
template <class Compute, class Combine>
void reduce_groups(const float* x, int64_t G, int64_t L, int64_t R, int num_threads, double* out,
                   const Compute& compute, const Combine& combine) {
  const int64_t ch = chunk_size(L);
  const int64_t nc = (L + ch - 1) / ch;
  if (nc == 1 || G >= 2 * static_cast<int64_t>(num_threads)) {
    // One thread per group, chunks in order.
    const int nt = clamp_threads(num_threads, G);
    const int64_t stride = thread_stride<double>(R);
    const int64_t run = group_run(G, nt);
    (void)run;  // only read by the OpenMP pragma
    std::vector<double> scratch(static_cast<size_t>(nt * stride));
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(dynamic, run)
#endif
    for (int64_t g = 0; g < G; ++g) {
      const int tid = thread_id();
      double* acc = out + g * R;
      double* part = scratch.data() + static_cast<int64_t>(tid) * stride;
      const float* base = x + g * L;
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t off = c * ch;
        const int64_t n = L - off < ch ? L - off : ch;
        compute(g, base + off, n, c == 0 ? acc : part, tid);
        if (c > 0) combine(acc, part);
      }
    }
  } else {
    // Few long groups: chunks in parallel, then an ordered combine.
    const int64_t items = G * nc;
    const int nt = clamp_threads(num_threads, items);
    (void)nt;  // only read by the OpenMP pragma
    std::vector<double> partial(static_cast<size_t>(items) * static_cast<size_t>(R));
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
#endif
    for (int64_t it = 0; it < items; ++it) {
      const int64_t g = it / nc, c = it % nc;
      const int64_t off = c * ch;
      const int64_t n = L - off < ch ? L - off : ch;
      compute(g, x + g * L + off, n, partial.data() + it * R, thread_id());
    }
    for (int64_t g = 0; g < G; ++g) {
      double* acc = out + g * R;
      std::memcpy(acc, partial.data() + g * nc * R, static_cast<size_t>(R) * sizeof(double));
      for (int64_t c = 1; c < nc; ++c) combine(acc, partial.data() + (g * nc + c) * R);
    }
  }
}

// Elementwise over [C, K] rows in chunks; fn(row, col_offset, n).
template <class Fn>
void for_each_chunk(int64_t C, int64_t K, int num_threads, const Fn& fn) {
  if (C == 0 || K == 0) return;
  const int64_t nc = (K + kElemChunk - 1) / kElemChunk;
  const int64_t items = C * nc;
  const int nt = clamp_threads(num_threads, items);
  (void)nt;  // only read by the OpenMP pragma
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
  for (int64_t it = 0; it < items; ++it) {
    const int64_t r = it / nc, off = (it % nc) * kElemChunk;
    fn(r, off, K - off < kElemChunk ? K - off : kElemChunk);
  }
}

// ilogb of a finite non-zero float, read from its exponent bits when normal.
inline int ilogb_f(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const int biased = static_cast<int>((u >> 23) & 0xffu);
  return biased != 0 && biased != 0xff ? biased - 127 : std::ilogb(x);
}

// 2^-e as a float (exact); e = 0, the usual case, costs nothing.
inline float pow2_neg(int e) {
  if (e == 0) return 1.0f;
  if (e >= -127 && e <= 126) {
    const uint32_t u = static_cast<uint32_t>(127 - e) << 23;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  return std::ldexp(1.0f, -e);
}

inline double qmax_of(int bits) { return static_cast<double>((int64_t{1} << bits) - 1); }

// float32 scale from a double, clamped to [FLT_MIN, FLT_MAX] (equivalent to
// casting first and clamping after, without the out-of-range cast).
inline float scale_to_f32(double s) {
  if (!(s >= static_cast<double>(FLT_MIN))) return FLT_MIN;
  if (s > static_cast<double>(FLT_MAX)) return FLT_MAX;
  return static_cast<float>(s);
}

// Range scaling for the float accumulation of |e|^p (see QParam::escale).
// Errors are O(scale); the ones that matter lie within scale * 2^[-24, 34]
// (the upper end covers clipped values: qmax / min clip factor < 2^34).
// When |e|^p over that span stays well inside the float range (always, for
// ordinary weights) no scaling is done; otherwise errors are scaled by 2^-E,
// E = ilogb(scale), and the sums multiplied back by 2^(p*E) in double.
int range_exponent(float scale, double p) {
  const int e = ilogb_f(scale);
  if (p * (e - 24) > -100.0 && p * (e + 34) < 100.0) return 0;
  return e;
}

// sum * 2^(p*E), exact when p*E is an integer.  Beyond +-4096 the result is
// 0 or inf either way (double exponents end at +-1074); exp2 saturates there
// and the int cast, undefined for such values, is never reached.
double unscale_sum(double sum, double p, int e) {
  // 0 stays 0 and an overflowed (inf) sum stays inf: never inf * 0 = NaN.
  if (e == 0 || sum == 0.0 || std::isinf(sum)) return sum;
  const double pe = p * static_cast<double>(e);
  if (pe == std::floor(pe) && std::fabs(pe) <= 4096.0) return std::ldexp(sum, static_cast<int>(pe));
  return sum * std::exp2(pe);
}

inline QParam make_qparam(float scale, int32_t zero_point, int bits, int range_exp = 0) {
  QParam q;
  q.escale = pow2_neg(range_exp);  // exact power of two (subnormal for E = 127)
  q.scale = scale;
  q.inv = 1.0f / scale;  // torch: inv_scale = 1.0f / scale (float32)
  q.zp = static_cast<float>(zero_point);
  q.tlo = -q.zp;
  q.thi = static_cast<float>(qmax_of(bits)) - q.zp;
  q.clamp = 1;
  return q;
}

// Whether nearbyint(w * inv) can leave [tlo, thi] for a finite w in [lo, hi].
// For inv > 0 the rounded product fl(w * inv) is monotone in w, and so is
// nearbyint, so the extremes are reached at lo and hi: when both stay inside,
// the kernel's clamp is a no-op for every element of the range.  The kernels
// compute the same float product and round half to even, as done here.
bool needs_clamp(const QParam& q, float lo, float hi) {
  const float rlo = round_even(lo * q.inv);
  const float rhi = round_even(hi * q.inv);
  return !(rlo >= q.tlo && rhi <= q.thi);
}

// Range scaling of the energy sum(w^2), like range_exponent: the squares that
// matter lie in amax^2 * 2^[-48, 0].  E is kept in [-126, 126] so that the
// scale 2^-E is a normal float (a subnormal one would read as 0 under DAZ).
int energy_exponent(float amax) {
  if (!(amax > 0.0f)) return 0;
  const int e = ilogb_f(amax);
  if (2 * (e - 24) > -120 && 2 * (e + 1) < 120) return 0;
  return e < -126 ? -126 : (e > 126 ? 126 : e);
}

// The kernel form of (scale, zero_point) for data known to lie in [lo, hi]:
// range exponent for p = 2 in *rexp, clamp dropped where it is a no-op.
inline QParam ranged_qparam(float scale, int32_t zero_point, int bits, float lo, float hi, int* rexp) {
  *rexp = range_exponent(scale, 2.0);
  QParam q = make_qparam(scale, zero_point, bits, *rexp);
  q.clamp = needs_clamp(q, lo, hi) ? 1 : 0;
  return q;
}

// Energy exponent of data in [lo, hi].
inline int energy_exponent(float lo, float hi) { return energy_exponent(-lo > hi ? -lo : hi); }

std::vector<QParam> make_qparams(const float* scale, const int32_t* zero_point, int64_t S,
                                 int bits) {
  std::vector<QParam> q(static_cast<size_t>(S));
  for (int64_t s = 0; s < S; ++s) q[s] = make_qparam(scale[s], zero_point[s], bits);
  return q;
}

}  // namespace

bool openmp_enabled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

namespace {

// Quantization parameters from a raw range (lo, hi); zero is included first:
// lo' = min(lo, 0), hi' = max(hi, 0).
//  asymmetric: scale = f32((hi' - lo') / qmax) computed in double, clamped to
//              [FLT_MIN, FLT_MAX]; zp = clamp(nearbyint(-lo' / scale), 0, qmax)
//              in double (round half to even).
//  symmetric:  scale = f32(max(-lo', hi') * 2 / qmax), zp = 2^(bits-1)
//              (torch.ao's quint8 symmetric convention).
//  all-zero range: scale = 1, zp as above.
// Inline so that the divisions of independent rows overlap (see minmax_run).
inline void qparams_inline(float lo, float hi, int bits, bool symmetric, float* scale,
                           int32_t* zero_point) {
  const double qmax = qmax_of(bits);
  const float lo0 = lo < 0.0f ? lo : 0.0f;
  const float hi0 = hi > 0.0f ? hi : 0.0f;
  if (symmetric) {
    const float amax = -lo0 > hi0 ? -lo0 : hi0;
    *zero_point = static_cast<int32_t>(int64_t{1} << (bits - 1));
    *scale = amax == 0.0f ? 1.0f : scale_to_f32(static_cast<double>(amax) * 2.0 / qmax);
    return;
  }
  const double range = static_cast<double>(hi0) - static_cast<double>(lo0);
  if (range == 0.0) {
    *scale = 1.0f;
    *zero_point = 0;
    return;
  }
  const float s = scale_to_f32(range / qmax);
  double z = round_even(-static_cast<double>(lo0) / static_cast<double>(s));
  z = z < 0.0 ? 0.0 : (z > qmax ? qmax : z);
  *scale = s;
  *zero_point = static_cast<int32_t>(z);
}

}  // namespace

void qparams_one(float lo, float hi, int bits, bool symmetric, float* scale, int32_t* zero_point) {
  qparams_inline(lo, hi, bits, symmetric, scale, zero_point);
}

void qparams(const float* lo, const float* hi, int64_t n, int bits, bool symmetric, float* scale,
             int32_t* zero_point) {
  for (int64_t i = 0; i < n; ++i) qparams_inline(lo[i], hi[i], bits, symmetric, scale + i, zero_point + i);
}

void channel_minmax(const float* w, int64_t C, int64_t K, int num_threads, float* lo, float* hi,
                    int64_t* n_nonfinite) {
  const KernelTable* t = current_table();
  std::vector<double> res(static_cast<size_t>(C) * 3);
  // Slot: lo, hi, count (all exact in double).
  auto compute = [t](int64_t, const float* x, int64_t n, double* slot, int) {
    float l, h;
    int64_t bad;
    t->minmax(x, n, &l, &h, &bad);
    slot[0] = l;
    slot[1] = h;
    slot[2] = static_cast<double>(bad);
  };
  auto combine = [](double* acc, const double* part) {
    acc[0] = part[0] < acc[0] ? part[0] : acc[0];
    acc[1] = part[1] > acc[1] ? part[1] : acc[1];
    acc[2] += part[2];
  };
  reduce_groups(w, C, K, 3, num_threads, res.data(), compute, combine);
  int64_t bad = 0;
  for (int64_t c = 0; c < C; ++c) {
    const double l = res[c * 3], h = res[c * 3 + 1];
    // A row without any finite value reports (0, 0).
    const bool none = l > h;
    lo[c] = none ? 0.0f : static_cast<float>(l);
    hi[c] = none ? 0.0f : static_cast<float>(h);
    bad += static_cast<int64_t>(res[c * 3 + 2]);
  }
  *n_nonfinite = bad;
}

namespace {

// The error table of prepared parameters qp[s * B + b] (with their range
// exponents rexp), and, unless energy is null, the energy of every row using
// the range exponent eexp[s] of its group.
void table_pass(const float* w, int64_t C, int64_t K, const QParam* qp, const int* rexp,
                const int* eexp, int64_t S, int64_t B, int num_threads, double* sse,
                float* max_abs, double* energy) {
  const KernelTable* t = current_table();
  const int nt = clamp_threads(num_threads, C * ((K + kMinChunk - 1) / kMinChunk));
  const int64_t R = 2 * B + 1;
  const int64_t stride = thread_stride<float>(B);
  std::vector<float> mx(static_cast<size_t>(nt * stride));
  std::vector<double> res(static_cast<size_t>(C) * static_cast<size_t>(R));
  // Slot: B sums of squares, B max |e| (floats are exact in double), energy.
  auto compute = [&](int64_t g, const float* x, int64_t n, double* slot, int tid) {
    float* m = mx.data() + static_cast<int64_t>(tid) * stride;
    const int64_t s = S == 1 ? 0 : g;
    const float es = energy ? pow2_neg(eexp[s]) : 1.0f;
    t->err_stats(x, n, qp + s * B, B, slot, m, es, energy ? slot + 2 * B : nullptr, nullptr, 0);
    for (int64_t b = 0; b < B; ++b) slot[B + b] = m[b];
    if (!energy) slot[2 * B] = 0.0;
  };
  auto combine = [B](double* acc, const double* part) {
    for (int64_t b = 0; b < B; ++b) acc[b] += part[b];
    for (int64_t b = B; b < 2 * B; ++b) acc[b] = part[b] > acc[b] ? part[b] : acc[b];
    acc[2 * B] += part[2 * B];
  };
  reduce_groups(w, C, K, R, nt, res.data(), compute, combine);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t s = S == 1 ? 0 : c;
    const double* r = res.data() + c * R;
    for (int64_t b = 0; b < B; ++b) {
      sse[b * C + c] = unscale_sum(r[b], 2.0, rexp[s * B + b]);
      max_abs[b * C + c] = static_cast<float>(r[B + b]);
    }
    if (energy) energy[c] = unscale_sum(r[2 * B], 2.0, eexp[s]);
  }
}

// Per-thread scratch of minmax_error_table for a run of up to `rows` rows.
struct RunScratch {
  std::vector<QParam> qp;    // [rows * B]
  std::vector<int> rexp;     // [rows * B]
  std::vector<double> acc;   // [B]
  std::vector<float> mx;     // [B]
  std::vector<int64_t> bad;  // [rows]
  RunScratch(int64_t rows, int64_t B)
      : qp(static_cast<size_t>(rows * B)), rexp(static_cast<size_t>(rows * B)),
        acc(static_cast<size_t>(B)), mx(static_cast<size_t>(B)), bad(static_cast<size_t>(rows)) {}
};

// Rows [r0, r1) of minmax_error_table, in three steps: the min/max of each row
// (the only read from memory), the parameters of every row and bit-width (the
// divisions of independent rows overlap when nothing else sits between them),
// then each row's table from cache while the row `ahead` rows further on is
// prefetched.  Returns the number of non-finite values; rows holding any are
// skipped (the caller clears everything then).
int64_t minmax_run(const KernelTable* t, const float* w, int64_t r0, int64_t r1, int64_t C,
                   int64_t K, const int32_t* bits, int64_t B, bool symmetric, int64_t ahead,
                   RunScratch& sc, float* lo, float* hi, float* scale, int32_t* zero_point,
                   double* sse, float* max_abs, double* energy) {
  int64_t total_bad = 0;
  for (int64_t c = r0; c < r1; ++c) {
    int64_t& bad = sc.bad[c - r0];
    t->minmax(w + c * K, K, lo + c, hi + c, &bad);
    if (lo[c] > hi[c]) lo[c] = hi[c] = 0.0f;  // no finite value, as channel_minmax reports
    total_bad += bad;
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = r0; c < r1; ++c)
      if (!sc.bad[c - r0])
        qparams_inline(lo[c], hi[c], bits[b], symmetric, scale + b * C + c, zero_point + b * C + c);
  for (int64_t c = r0; c < r1; ++c) {
    if (sc.bad[c - r0]) continue;
    QParam* qp = sc.qp.data() + (c - r0) * B;
    int* rexp = sc.rexp.data() + (c - r0) * B;
    for (int64_t b = 0; b < B; ++b)
      qp[b] = ranged_qparam(scale[b * C + c], zero_point[b * C + c], bits[b], lo[c], hi[c], rexp + b);
  }
  for (int64_t c = r0; c < r1; ++c) {
    if (sc.bad[c - r0]) continue;
    const int* rexp = sc.rexp.data() + (c - r0) * B;
    const int ee = energy_exponent(lo[c], hi[c]);
    const float* next = c + ahead < C ? w + (c + ahead) * K : nullptr;
    double en;
    t->err_stats(w + c * K, K, sc.qp.data() + (c - r0) * B, B, sc.acc.data(), sc.mx.data(),
                 pow2_neg(ee), &en, next, next ? K : 0);
    for (int64_t b = 0; b < B; ++b) {
      sse[b * C + c] = unscale_sum(sc.acc[b], 2.0, rexp[b]);
      max_abs[b * C + c] = sc.mx[b];
    }
    energy[c] = unscale_sum(en, 2.0, ee);
  }
  return total_bad;
}

}  // namespace

void error_table(const float* w, int64_t C, int64_t K, const float* scale, const int32_t* zero_point,
                 int64_t S, const int32_t* bits, int64_t B, int num_threads, double* sse,
                 float* max_abs) {
  // qp[s * B + b]: the B parameter sets of row s are contiguous.
  std::vector<QParam> qp(static_cast<size_t>(S * B));
  std::vector<int> rexp(static_cast<size_t>(S * B));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) {
      const int e = range_exponent(scale[b * S + s], 2.0);
      rexp[s * B + b] = e;
      qp[s * B + b] = make_qparam(scale[b * S + s], zero_point[b * S + s], bits[b], e);
    }
  table_pass(w, C, K, qp.data(), rexp.data(), nullptr, S, B, num_threads, sse, max_abs, nullptr);
}

void row_energy(const float* w, int64_t C, int64_t K, const float* lo, const float* hi,
                int num_threads, double* energy) {
  std::vector<int> eexp(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) eexp[c] = energy_exponent(lo[c], hi[c]);
  table_pass(w, C, K, nullptr, nullptr, eexp.data(), C, 0, num_threads, nullptr, nullptr, energy);
}

void minmax_error_table(const float* w, int64_t C, int64_t K, const int32_t* bits, int64_t B,
                        bool per_channel, bool symmetric, int num_threads, float* lo, float* hi,
                        float* scale, int32_t* zero_point, double* sse, float* max_abs,
                        double* energy, int64_t* n_nonfinite) {
  const KernelTable* t = current_table();
  const int64_t S = per_channel ? C : 1;
  // Everything but the ranges is zeroed for a refused (non-finite) tensor, so
  // no uninitialised or half-filled output is left behind.
  auto clear_outputs = [&] {
    std::fill(sse, sse + B * C, 0.0);
    std::fill(max_abs, max_abs + B * C, 0.0f);
    std::fill(scale, scale + B * S, 0.0f);
    std::fill(zero_point, zero_point + B * S, 0);
    std::fill(energy, energy + C, 0.0);
  };
  if (per_channel && K <= kMinChunk) {
    // Fused: each row is read from memory once (min/max), then served from
    // cache to all bit-widths and the energy.  A row is one chunk of
    // error_table's reduction, so the sums equal the two-pass results.
    const int nt = clamp_threads(num_threads, (C * K + kSmallWork - 1) / kSmallWork);
    // Runs of rows small enough to stay in cache between the min/max and the
    // table, and to give each thread several runs.
    int64_t run = kRunBytes / (4 * K);
    run = run < 1 ? 1 : run;
    run = run < group_run(C, nt) ? run : group_run(C, nt);
    const int64_t n_runs = (C + run - 1) / run;
    // Rows are prefetched at least kPrefetchBytes ahead (one row at least):
    // short rows need more than one row of lead to hide the memory latency.
    const int64_t ahead = (kPrefetchBytes + 4 * K - 1) / (4 * K);
    int64_t bad = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) reduction(+ : bad)
#endif
    {
      RunScratch scratch(run, B);  // one per thread: nothing shared is written
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
      for (int64_t i = 0; i < n_runs; ++i) {
        const int64_t r0 = i * run, r1 = r0 + run < C ? r0 + run : C;
        bad += minmax_run(t, w, r0, r1, C, K, bits, B, symmetric, ahead, scratch, lo, hi, scale,
                          zero_point, sse, max_abs, energy);
      }
    }
    *n_nonfinite = bad;
    if (bad) clear_outputs();
    return;
  }
  // Per tensor (or very long rows): the range must be known before the table.
  channel_minmax(w, C, K, num_threads, lo, hi, n_nonfinite);
  if (*n_nonfinite) {
    clear_outputs();
    return;
  }
  std::vector<float> glo(lo, lo + S), ghi(hi, hi + S);
  if (!per_channel)
    for (int64_t c = 1; c < C; ++c) {
      glo[0] = lo[c] < glo[0] ? lo[c] : glo[0];
      ghi[0] = hi[c] > ghi[0] ? hi[c] : ghi[0];
    }
  std::vector<QParam> qp(static_cast<size_t>(S * B));
  std::vector<int> rexp(static_cast<size_t>(S * B)), eexp(static_cast<size_t>(S));
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t b = 0; b < B; ++b) {
      float sc;
      int32_t z;
      qparams_inline(glo[s], ghi[s], bits[b], symmetric, &sc, &z);
      scale[b * S + s] = sc;
      zero_point[b * S + s] = z;
      qp[s * B + b] = ranged_qparam(sc, z, bits[b], glo[s], ghi[s], &rexp[s * B + b]);
    }
    eexp[s] = energy_exponent(glo[s], ghi[s]);
  }
  table_pass(w, C, K, qp.data(), rexp.data(), eexp.data(), S, B, num_threads, sse, max_abs, energy);
}

void weighted_error_table(const float* w, int64_t C, int64_t K, const float* v, bool v_per_row,
                          float vmax, const float* scale, const int32_t* zero_point, int64_t S,
                          const int32_t* bits, int64_t B, int num_threads, double* wsse) {
  const KernelTable* t = current_table();
  // v * 2^-E <= 1 for the largest weight: products of (scaled) errors and
  // weights stay in float range; the sums are multiplied back by 2^E.
  const int vexp = vmax > 0.0f ? ilogb_f(vmax) + 1 : 0;
  const float vscale = std::ldexp(1.0f, -vexp);
  std::vector<QParam> qp(static_cast<size_t>(S * B));
  std::vector<int> rexp(static_cast<size_t>(S * B));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) {
      const int e = range_exponent(scale[b * S + s], 2.0);
      rexp[s * B + b] = e;
      qp[s * B + b] = make_qparam(scale[b * S + s], zero_point[b * S + s], bits[b], e);
    }
  std::vector<double> res(static_cast<size_t>(C) * static_cast<size_t>(B));
  auto compute = [&](int64_t g, const float* x, int64_t n, double* slot, int) {
    const int64_t off = x - (w + g * K);  // position of this chunk in its row
    const float* vx = v + (v_per_row ? g * K : 0) + off;
    t->wsse(x, vx, n, qp.data() + (S == 1 ? 0 : g) * B, B, vscale, slot);
  };
  auto combine = [B](double* acc, const double* part) {
    for (int64_t b = 0; b < B; ++b) acc[b] += part[b];
  };
  reduce_groups(w, C, K, B, num_threads, res.data(), compute, combine);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t s = S == 1 ? 0 : c;
    for (int64_t b = 0; b < B; ++b)
      wsse[b * C + c] = std::ldexp(unscale_sum(res[c * B + b], 2.0, rexp[s * B + b]), vexp);
  }
}

bool weights_ok(const float* v, int64_t n, int num_threads, float* vmax) {
  const int nt = clamp_threads(num_threads, (n + kElemChunk - 1) / kElemChunk);
  (void)nt;  // only read by the OpenMP pragma
  float mx = 0.0f;
  int64_t bad = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) reduction(max : mx) reduction(+ : bad) schedule(static)
#endif
  for (int64_t i = 0; i < n; ++i) {
    const float x = v[i];
    if (!(x >= 0.0f && x <= FLT_MAX)) ++bad;  // NaN, negative or inf
    else mx = x > mx ? x : mx;
  }
  *vmax = mx;
  return bad == 0;
}

namespace {

// Candidate i of the clipping grid: the range shrunk by factor 1 - i * step.
void candidate_qparams(float lo, float hi, int bits, bool symmetric, int64_t i, double step,
                       float* scale, int32_t* zero_point) {
  const double factor = 1.0 - static_cast<double>(i) * step;
  const float lo0 = lo < 0.0f ? lo : 0.0f;
  const float hi0 = hi > 0.0f ? hi : 0.0f;
  const float lo_i = static_cast<float>(static_cast<double>(lo0) * factor);
  const float hi_i = static_cast<float>(static_cast<double>(hi0) * factor);
  qparams_inline(lo_i, hi_i, bits, symmetric, scale, zero_point);
}

}  // namespace

void clip_search(const float* w, int64_t C, int64_t K, const float* lo, const float* hi, int64_t S,
                 const int32_t* bits, int64_t B, bool symmetric, int64_t n_grid, double step,
                 double p, int num_threads, int32_t* best_index, float* scale,
                 int32_t* zero_point, double* lp_err) {
  const KernelTable* t = current_table();
  const int64_t M = B * n_grid;  // candidates per group, index b * n_grid + i
  // Groups: the rows (per-channel) or the whole matrix (per-tensor).
  const int64_t G = S;
  const int64_t L = S == 1 ? C * K : K;
  const int nt = clamp_threads(num_threads, G * ((L + kMinChunk - 1) / kMinChunk));
  // Per-thread candidate parameters, rebuilt per work item (cheap next to
  // the M * n evaluations that follow).
  std::vector<QParam> qp(static_cast<size_t>(nt) * static_cast<size_t>(M));
  std::vector<double> err(static_cast<size_t>(G) * static_cast<size_t>(M));
  auto compute = [&](int64_t g, const float* x, int64_t n, double* slot, int tid) {
    QParam* q = qp.data() + static_cast<int64_t>(tid) * M;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < n_grid; ++i) {
        float s;
        int32_t z;
        candidate_qparams(lo[g], hi[g], bits[b], symmetric, i, step, &s, &z);
        q[b * n_grid + i] = make_qparam(s, z, bits[b], range_exponent(s, p));
      }
    t->lp_err(x, n, q, M, p, slot);
  };
  auto combine = [M](double* acc, const double* part) {
    for (int64_t j = 0; j < M; ++j) acc[j] += part[j];
  };
  reduce_groups(w, G, L, M, nt, err.data(), compute, combine);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t b = 0; b < B; ++b) {
      double* e = err.data() + g * M + b * n_grid;
      float s;
      int32_t z;
      for (int64_t i = 0; i < n_grid; ++i) {
        candidate_qparams(lo[g], hi[g], bits[b], symmetric, i, step, &s, &z);
        e[i] = unscale_sum(e[i], p, range_exponent(s, p));
      }
      int64_t best = 0;
      for (int64_t i = 1; i < n_grid; ++i)
        if (e[i] < e[best]) best = i;  // ties keep the lowest index
      candidate_qparams(lo[g], hi[g], bits[b], symmetric, best, step, &s, &z);
      best_index[b * S + g] = static_cast<int32_t>(best);
      scale[b * S + g] = s;
      zero_point[b * S + g] = z;
      lp_err[b * S + g] = e[best];
    }
}

int64_t clip_search_scratch_bytes(int64_t C, int64_t K, int64_t S, int64_t B, int64_t n_grid,
                                  int num_threads) {
  // Mirrors clip_search() and reduce_groups(); doubles avoid int64 overflow
  // for absurd arguments (the result saturates at INT64_MAX).
  const double M = static_cast<double>(B) * static_cast<double>(n_grid);
  const int64_t G = S, L = S == 1 ? C * K : K;
  const int nt = clamp_threads(num_threads, G * ((L + kMinChunk - 1) / kMinChunk));
  const int64_t nc = (L + chunk_size(L) - 1) / chunk_size(L);
  const bool chunked = !(nc == 1 || G >= 2 * static_cast<int64_t>(nt));
  const double reduce = chunked ? static_cast<double>(G) * nc * M : static_cast<double>(nt) * (M + 16);
  const double bytes = static_cast<double>(nt) * M * sizeof(QParam) +
                       (static_cast<double>(G) * M + reduce) * sizeof(double);
  return bytes >= 9.0e18 ? INT64_MAX : static_cast<int64_t>(bytes);
}

namespace {

// Element-wise map of x[C, K] through one of the table's per-range kernels,
// row r using parameter set r (per channel) or 0 (per tensor).
template <class In, class Out>
void map_rows(const In* x, int64_t C, int64_t K, const float* scale, const int32_t* zero_point,
              int64_t S, int bits, int num_threads, Out* out,
              void (*kernel)(const In*, int64_t, const QParam*, Out*)) {
  const std::vector<QParam> qp = make_qparams(scale, zero_point, S, bits);
  for_each_chunk(C, K, num_threads, [&](int64_t r, int64_t off, int64_t n) {
    kernel(x + r * K + off, n, &qp[S == 1 ? 0 : r], out + r * K + off);
  });
}

}  // namespace

void fake_quantize(const float* w, int64_t C, int64_t K, const float* scale,
                   const int32_t* zero_point, int64_t S, int bits, int num_threads, float* out) {
  map_rows(w, C, K, scale, zero_point, S, bits, num_threads, out, current_table()->fake_quant);
}

void quantize(const float* w, int64_t C, int64_t K, const float* scale, const int32_t* zero_point,
              int64_t S, int bits, int num_threads, uint8_t* out) {
  map_rows(w, C, K, scale, zero_point, S, bits, num_threads, out, current_table()->quant_u8);
}

void quantize(const float* w, int64_t C, int64_t K, const float* scale, const int32_t* zero_point,
              int64_t S, int bits, int num_threads, uint16_t* out) {
  map_rows(w, C, K, scale, zero_point, S, bits, num_threads, out, current_table()->quant_u16);
}

void dequantize(const uint8_t* codes, int64_t C, int64_t K, const float* scale,
                const int32_t* zero_point, int64_t S, int bits, int num_threads, float* out) {
  map_rows(codes, C, K, scale, zero_point, S, bits, num_threads, out, current_table()->dequant_u8);
}

void dequantize(const uint16_t* codes, int64_t C, int64_t K, const float* scale,
                const int32_t* zero_point, int64_t S, int bits, int num_threads, float* out) {
  map_rows(codes, C, K, scale, zero_point, S, bits, num_threads, out, current_table()->dequant_u16);
}

namespace {

template <class T>
uint32_t max_code_impl(const T* c, int64_t n) {
  T m = 0;
  for (int64_t i = 0; i < n; ++i) m = c[i] > m ? c[i] : m;
  return m;
}

template <class T>
bool pack_impl(const T* codes, int64_t n, int bits, uint8_t* out) {
  const uint32_t limit = uint32_t{1} << bits;
  uint32_t over = 0;
  uint64_t acc = 0;
  int nb = 0;
  int64_t o = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t v = codes[i];
    over |= v >= limit ? 1u : 0u;
    acc |= static_cast<uint64_t>(v & (limit - 1)) << nb;
    nb += bits;
    while (nb >= 8) {
      out[o++] = static_cast<uint8_t>(acc);
      acc >>= 8;
      nb -= 8;
    }
  }
  if (nb > 0) out[o] = static_cast<uint8_t>(acc);
  return over == 0;
}

template <class T>
void unpack_impl(const uint8_t* packed, int64_t n, int bits, T* out) {
  const uint64_t mask = (uint64_t{1} << bits) - 1;
  uint64_t acc = 0;
  int nb = 0;
  int64_t ip = 0;
  for (int64_t i = 0; i < n; ++i) {
    while (nb < bits) {
      acc |= static_cast<uint64_t>(packed[ip++]) << nb;
      nb += 8;
    }
    out[i] = static_cast<T>(acc & mask);
    acc >>= bits;
    nb -= bits;
  }
}

}  // namespace

// Codes per work item of unpack_dequantize: a multiple of 8 (each item starts
// on a byte), and its uint16 buffer (8 KiB) stays in L1 between the two steps.
constexpr int64_t kUnpackChunk = 4096;
// Codes per thread below which another thread costs more than it brings.
constexpr int64_t kUnpackPerThread = 65536;

void unpack_dequantize(const uint8_t* packed, int bits, int64_t A, int64_t C, int64_t R, int64_t block,
                       const float* scale, const int32_t* zero_point, int num_threads, float* out) {
  const int64_t n = A * C * R;
  if (n == 0) return;
  const int64_t G = (R + block - 1) / block;
  const std::vector<QParam> qp = make_qparams(scale, zero_point, C * G, bits);
  const KernelTable* t = current_table();  // read once: one level for the whole call
  const int64_t items = (n + kUnpackChunk - 1) / kUnpackChunk;
  const int nt = clamp_threads(num_threads, (n + kUnpackPerThread - 1) / kUnpackPerThread);
  (void)nt;  // only read by the OpenMP pragma
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
  for (int64_t it = 0; it < items; ++it) {
    alignas(64) uint16_t buf[kUnpackChunk];
    const int64_t i0 = it * kUnpackChunk;
    const int64_t m = n - i0 < kUnpackChunk ? n - i0 : kUnpackChunk;
    t->unpack_u16(packed + i0 / 8 * bits, m, bits, buf);
    // Runs of codes that share one parameter set: within one block of one row.
    for (int64_t i = i0; i < i0 + m;) {
      const int64_t r = i % R, c = (i / R) % C;
      int64_t len = block - r % block;
      if (len > R - r) len = R - r;
      if (len > i0 + m - i) len = i0 + m - i;
      t->dequant_u16(buf + (i - i0), len, &qp[static_cast<size_t>(c * G + r / block)], out + i);
      i += len;
    }
  }
}

// Weights per thread below which another thread costs more than it brings.
constexpr int64_t kMatvecPerThread = 262144;
// Matrix rows per code_dot call (and per OpenMP work item), fewer when a row
// has many blocks (its scratch holds 4 doubles per block and row).
constexpr int64_t kMatvecRun = 16;
constexpr int64_t kMatvecScratch = 16384;

void packed_matvec(const uint8_t* packed, int bits, int64_t C, int64_t K, int64_t block, const float* scale,
                   const int32_t* zero_point, int64_t S, const float* x, int64_t N, int num_threads, float* y) {
  if (C == 0 || N == 0) return;
  if (K == 0) {  // empty sums
    for (int64_t i = 0; i < N * C; ++i) y[i] = 0.0f;
    return;
  }
  const int64_t G = (K + block - 1) / block;
  // sum x over each block of each input row, in double (shared by every matrix row;
  // four independent sums, so that a long row is not one chain of dependent adds).
  std::vector<double> xs(static_cast<size_t>(N * G), 0.0);
  for (int64_t r = 0; r < N; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const float* xb = x + r * K + g * block;
      const int64_t len = std::min(K - g * block, block);
      double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
      int64_t k = 0;
      for (; k + 4 <= len; k += 4) {
        s0 += xb[k];
        s1 += xb[k + 1];
        s2 += xb[k + 2];
        s3 += xb[k + 3];
      }
      for (; k < len; ++k) s0 += xb[k];
      xs[static_cast<size_t>(r * G + g)] = (s0 + s1) + (s2 + s3);
    }
  const KernelTable* t = current_table();  // read once: one level for the whole call
  const uint8_t* end = packed + packed_bytes(C * K, bits);
  const int64_t run = std::max<int64_t>(1, std::min(kMatvecRun, kMatvecScratch / G));
  const int64_t items = (C + run - 1) / run;
  const int nt = clamp_threads(num_threads, std::min(items, (C * K + kMatvecPerThread - 1) / kMatvecPerThread));
  const int64_t stride = thread_stride<double>(run * G * kDotMaxRows);
  std::vector<double> scratch(static_cast<size_t>(nt * stride));
  // Per thread: room for the kernel's reordered copy of x (N rows) and one flag per pass of kDotMaxRows rows.
  const int64_t passes = (N + kDotMaxRows - 1) / kDotMaxRows;
  const int64_t xstride = thread_stride<float>(N * K);
  std::vector<float> xbuf(static_cast<size_t>(nt * xstride));
  std::vector<int> xready(static_cast<size_t>(nt * passes), 0);
  (void)nt;  // only read by the OpenMP pragma when there is one
  // Dynamic: on a shared machine a thread that loses its core does not hold the
  // others up with half the rows (rows are independent, so the result is the same).
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
#endif
  for (int64_t it = 0; it < items; ++it) {
    const int tid = thread_id();
    double* sums = scratch.data() + tid * stride;
    const int64_t c0 = it * run;
    const int64_t m = std::min(run, C - c0);
    for (int64_t r0 = 0, pass = 0; r0 < N; r0 += kDotMaxRows, ++pass) {
      const int64_t nx = std::min(kDotMaxRows, N - r0);
      t->code_dot(packed, end, c0 * K, m, K, block, bits, x + r0 * K, K, nx, xbuf.data() + tid * xstride + r0 * K,
                  xready.data() + tid * passes + pass, sums);
      for (int64_t q = 0; q < m; ++q) {
        const int64_t c = c0 + q;
        const double* cs = sums + q * G * nx;
        for (int64_t r = 0; r < nx; ++r) {
          const double* xr = xs.data() + (r0 + r) * G;
          double acc = 0.0;
          for (int64_t g = 0; g < G; ++g) {
            const int64_t i = S == 1 ? 0 : c * G + g;
            acc += static_cast<double>(scale[i]) * (cs[g * nx + r] - static_cast<double>(zero_point[i]) * xr[g]);
          }
          y[(r0 + r) * C + c] = static_cast<float>(acc);
        }
      }
    }
  }
}

uint32_t max_code(const uint8_t* codes, int64_t n) { return max_code_impl(codes, n); }
uint32_t max_code(const uint16_t* codes, int64_t n) { return max_code_impl(codes, n); }

int64_t packed_bytes(int64_t n, int bits) {
  return static_cast<int64_t>((static_cast<uint64_t>(n) * static_cast<uint64_t>(bits) + 7) / 8);
}

bool pack_bits(const uint8_t* codes, int64_t n, int bits, uint8_t* out) {
  return pack_impl(codes, n, bits, out);
}
bool pack_bits(const uint16_t* codes, int64_t n, int bits, uint8_t* out) {
  return pack_impl(codes, n, bits, out);
}
void unpack_bits(const uint8_t* packed, int64_t n, int bits, uint8_t* out) {
  unpack_impl(packed, n, bits, out);
}
void unpack_bits(const uint8_t* packed, int64_t n, int bits, uint16_t* out) {
  unpack_impl(packed, n, bits, out);
}

}  // namespace mixquant

// ===================================================================== groups ==
// Group-wise quantizers: a row of K weights is split into G = ceil(K / gs)
// groups of gs consecutive elements (the last one possibly short), each with
// its own (scale, zero point); parameter arrays are [C * G] in (row, group)
// order.  Every group is one "segment" handed to the per-ISA kernels, which
// already work on any contiguous run of floats with one parameter set.

namespace mixquant {
namespace {

// Smallest bfloat16 >= s for a positive finite float s (the largest finite
// bfloat16 when s is above it).  Rounding up keeps the whole range on the grid.
inline float bf16_ceil(float s) {
  uint32_t u;
  std::memcpy(&u, &s, sizeof u);
  u = (u + 0xffffu) & 0xffff0000u;
  if (u >= 0x7f800000u) u = 0x7f7f0000u;
  float r;
  std::memcpy(&r, &u, sizeof r);
  return r;
}

// qparams_inline with the scale rounded up to bfloat16 first and the zero
// point computed from the rounded scale.
inline void group_qparams_inline(float lo, float hi, int bits, bool symmetric, float* scale,
                                 int32_t* zero_point) {
  qparams_inline(lo, hi, bits, symmetric, scale, zero_point);
  const float s = bf16_ceil(*scale);
  *scale = s;
  if (symmetric || s == 1.0f) return;  // symmetric zp is fixed; scale 1 only for a zero range
  const double qmax = qmax_of(bits);
  const float lo0 = lo < 0.0f ? lo : 0.0f;
  double z = round_even(-static_cast<double>(lo0) / static_cast<double>(s));
  *zero_point = static_cast<int32_t>(z < 0.0 ? 0.0 : (z > qmax ? qmax : z));
}

// Work items of the group drivers: (row, run of up to `per` groups); the split
// depends only on K and gs, never on the thread count.
struct GroupItems {
  int64_t G, per, runs;
  GroupItems(int64_t K, int64_t gs) {
    G = (K + gs - 1) / gs;
    per = kMinChunk / gs;
    per = per < 1 ? 1 : (per > G ? G : per);
    runs = (G + per - 1) / per;
  }
  int64_t seg_len(int64_t K, int64_t gs, int64_t g) const { return K - g * gs < gs ? K - g * gs : gs; }
};

// Per-(row segment, parameter set) statistics: the error sums and max |e| of
// B parameter sets on x[0, n) and, unless energy is null, the energy.  This
// is the primitive the group table is built from; a weighted table passes a
// functor that reads the weights of the same segment.
struct PlainSegmentStats {
  const KernelTable* t;
  void operator()(int64_t /*row*/, int64_t /*col*/, const float* x, int64_t n, const QParam* qp,
                  int64_t B, double* acc, float* mx, float energy_escale, double* energy) const {
    t->err_stats(x, n, qp, B, acc, mx, energy_escale, energy, nullptr, 0);
  }
};

// The error table of every row, group by group: prepare(row, g, x, n, qp, rexp,
// &eexp) fills the B parameter sets of the segment (returning its count of
// non-finite values; then the segment is skipped), stats() measures them.
// Sums are unscaled per segment and added in group order in double, so the
// result does not depend on the thread count.  energy may be null.
template <class Prepare, class Stats>
int64_t group_table_pass(const float* w, int64_t C, int64_t K, int64_t gs, int64_t B,
                         int num_threads, const Prepare& prepare, const Stats& stats, double* sse,
                         float* max_abs, double* energy) {
  const GroupItems gi(K, gs);
  const int64_t items = C * gi.runs;
  const int64_t R = 2 * B + 1;
  std::vector<double> part(static_cast<size_t>(items) * static_cast<size_t>(R));
  const int nt = clamp_threads(num_threads, (C * K + kSmallWork - 1) / kSmallWork);
  const int64_t run = group_run(items, nt);
  (void)run;  // only read by the OpenMP pragma
  int64_t bad = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) reduction(+ : bad)
#endif
  {
    std::vector<QParam> qp(static_cast<size_t>(B));
    std::vector<int> rexp(static_cast<size_t>(B));
    std::vector<double> acc(static_cast<size_t>(B));
    std::vector<float> mx(static_cast<size_t>(B));
#ifdef _OPENMP
#pragma omp for schedule(dynamic, run)
#endif
    for (int64_t it = 0; it < items; ++it) {
      const int64_t c = it / gi.runs, g0 = (it % gi.runs) * gi.per;
      const int64_t g1 = g0 + gi.per < gi.G ? g0 + gi.per : gi.G;
      double* out = part.data() + it * R;
      for (int64_t j = 0; j < R; ++j) out[j] = 0.0;
      for (int64_t g = g0; g < g1; ++g) {
        const float* x = w + c * K + g * gs;
        const int64_t n = gi.seg_len(K, gs, g);
        int ee = 0;
        const int64_t nb = prepare(c, g, x, n, qp.data(), rexp.data(), &ee);
        if (nb) {
          bad += nb;
          continue;
        }
        double en = 0.0;
        stats(c, g * gs, x, n, qp.data(), B, acc.data(), mx.data(), pow2_neg(ee), energy ? &en : nullptr);
        for (int64_t b = 0; b < B; ++b) {
          out[b] += unscale_sum(acc[b], 2.0, rexp[b]);
          out[B + b] = mx[b] > out[B + b] ? mx[b] : out[B + b];
        }
        out[2 * B] += unscale_sum(en, 2.0, ee);
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    double* acc = part.data() + c * gi.runs * R;
    for (int64_t r = 1; r < gi.runs; ++r) {
      const double* p = acc + r * R;
      for (int64_t b = 0; b < B; ++b) acc[b] += p[b];
      for (int64_t b = B; b < 2 * B; ++b) acc[b] = p[b] > acc[b] ? p[b] : acc[b];
      acc[2 * B] += p[2 * B];
    }
    for (int64_t b = 0; b < B; ++b) {
      sse[b * C + c] = acc[b];
      max_abs[b * C + c] = static_cast<float>(acc[B + b]);
    }
    if (energy) energy[c] = acc[2 * B];
  }
  return bad;
}

// fn(segment index i = row * G + g, x offset, n) over every group, in parallel.
template <class Fn>
void for_each_group(int64_t C, int64_t K, int64_t gs, int num_threads, const Fn& fn) {
  if (C == 0 || K == 0) return;
  const GroupItems gi(K, gs);
  const int64_t items = C * gi.runs;
  const int nt = clamp_threads(num_threads, (C * K + kElemChunk - 1) / kElemChunk);
  (void)nt;  // only read by the OpenMP pragma
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
  for (int64_t it = 0; it < items; ++it) {
    const int64_t c = it / gi.runs, g0 = (it % gi.runs) * gi.per;
    const int64_t g1 = g0 + gi.per < gi.G ? g0 + gi.per : gi.G;
    for (int64_t g = g0; g < g1; ++g) fn(c * gi.G + g, c * K + g * gs, gi.seg_len(K, gs, g));
  }
}

template <class In, class Out>
void map_groups(const In* x, int64_t C, int64_t K, int64_t gs, const float* scale,
                const int32_t* zero_point, int bits, int num_threads, Out* out,
                void (*kernel)(const In*, int64_t, const QParam*, Out*)) {
  for_each_group(C, K, gs, num_threads, [&](int64_t i, int64_t off, int64_t n) {
    const QParam q = make_qparam(scale[i], zero_point[i], bits);
    kernel(x + off, n, &q, out + off);
  });
}

}  // namespace

int64_t group_count(int64_t K, int64_t group_size) { return (K + group_size - 1) / group_size; }

void group_qparams(const float* lo, const float* hi, int64_t n, int bits, bool symmetric, float* scale,
                   int32_t* zero_point) {
  for (int64_t i = 0; i < n; ++i)
    group_qparams_inline(lo[i], hi[i], bits, symmetric, scale + i, zero_point + i);
}

void group_minmax(const float* w, int64_t C, int64_t K, int64_t group_size, int num_threads, float* lo,
                  float* hi, int64_t* n_nonfinite) {
  const KernelTable* t = current_table();
  const int64_t G = group_count(K, group_size);
  std::vector<int64_t> bad(static_cast<size_t>(C * G));
  for_each_group(C, K, group_size, num_threads, [&](int64_t i, int64_t off, int64_t n) {
    t->minmax(w + off, n, lo + i, hi + i, &bad[i]);
    if (lo[i] > hi[i]) lo[i] = hi[i] = 0.0f;  // no finite value, as channel_minmax reports
  });
  int64_t total = 0;
  for (int64_t i = 0; i < C * G; ++i) total += bad[i];
  *n_nonfinite = total;
}

void group_minmax_error_table(const float* w, int64_t C, int64_t K, int64_t group_size,
                              const int32_t* bits, int64_t B, bool symmetric, int num_threads,
                              float* lo, float* hi, float* scale, int32_t* zero_point, double* sse,
                              float* max_abs, double* energy, int64_t* n_nonfinite) {
  const KernelTable* t = current_table();
  const int64_t G = group_count(K, group_size), S = C * G;
  // Fused: each segment is read from memory once (min/max), then served from
  // cache to the parameters and errors of every bit-width and to the energy.
  auto prepare = [&](int64_t c, int64_t g, const float* x, int64_t n, QParam* qp, int* rexp, int* ee) {
    const int64_t i = c * G + g;
    int64_t nb;
    t->minmax(x, n, lo + i, hi + i, &nb);
    if (lo[i] > hi[i]) lo[i] = hi[i] = 0.0f;
    if (nb) return nb;
    for (int64_t b = 0; b < B; ++b) {
      group_qparams_inline(lo[i], hi[i], bits[b], symmetric, scale + b * S + i, zero_point + b * S + i);
      qp[b] = ranged_qparam(scale[b * S + i], zero_point[b * S + i], bits[b], lo[i], hi[i], rexp + b);
    }
    *ee = energy_exponent(lo[i], hi[i]);
    return int64_t{0};
  };
  const int64_t bad = group_table_pass(w, C, K, group_size, B, num_threads, prepare,
                                       PlainSegmentStats{t}, sse, max_abs, energy);
  *n_nonfinite = bad;
  if (bad) {  // refused tensor: only the ranges are kept
    std::fill(sse, sse + B * C, 0.0);
    std::fill(max_abs, max_abs + B * C, 0.0f);
    std::fill(scale, scale + B * S, 0.0f);
    std::fill(zero_point, zero_point + B * S, 0);
    std::fill(energy, energy + C, 0.0);
  }
}

void group_error_table(const float* w, int64_t C, int64_t K, int64_t group_size, const float* scale,
                       const int32_t* zero_point, const int32_t* bits, int64_t B, int num_threads,
                       double* sse, float* max_abs) {
  const KernelTable* t = current_table();
  const int64_t S = C * group_count(K, group_size);
  auto prepare = [&](int64_t c, int64_t g, const float*, int64_t, QParam* qp, int* rexp, int*) {
    const int64_t i = c * (S / C) + g;
    for (int64_t b = 0; b < B; ++b) {
      rexp[b] = range_exponent(scale[b * S + i], 2.0);
      qp[b] = make_qparam(scale[b * S + i], zero_point[b * S + i], bits[b], rexp[b]);
    }
    return int64_t{0};
  };
  group_table_pass(w, C, K, group_size, B, num_threads, prepare, PlainSegmentStats{t}, sse, max_abs,
                   nullptr);
}

int64_t group_clip_search_scratch_bytes(int64_t C, int64_t K, int64_t group_size, int64_t B,
                                        int64_t n_grid, int num_threads) {
  const double M = static_cast<double>(B) * static_cast<double>(n_grid);
  const int nt = clamp_threads(num_threads, C * group_count(K, group_size));
  const double bytes = static_cast<double>(nt) * M * (sizeof(QParam) + sizeof(double));
  return bytes >= 9.0e18 ? INT64_MAX : static_cast<int64_t>(bytes);
}

void group_clip_search(const float* w, int64_t C, int64_t K, int64_t group_size, const float* lo,
                       const float* hi, const int32_t* bits, int64_t B, bool symmetric, int64_t n_grid,
                       double step, double p, int num_threads, int32_t* best_index, float* scale,
                       int32_t* zero_point, double* lp_err) {
  const KernelTable* t = current_table();
  const int64_t G = group_count(K, group_size), S = C * G;
  const int64_t M = B * n_grid;
  const int nt = clamp_threads(num_threads, S);
  const int64_t run = group_run(S, nt);
  (void)run;  // only read by the OpenMP pragma
  // Candidate i of bit-width b: the clipping search's shrunk range, with the
  // group quantizer's bfloat16 scale.
  auto candidate = [&](int64_t i, int64_t b, int64_t k, float* s, int32_t* z) {
    const double factor = 1.0 - static_cast<double>(k) * step;
    const float lo0 = lo[i] < 0.0f ? lo[i] : 0.0f;
    const float hi0 = hi[i] > 0.0f ? hi[i] : 0.0f;
    group_qparams_inline(static_cast<float>(static_cast<double>(lo0) * factor),
                         static_cast<float>(static_cast<double>(hi0) * factor), bits[b], symmetric, s, z);
  };
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
  {
    std::vector<QParam> qp(static_cast<size_t>(M));
    std::vector<double> err(static_cast<size_t>(M));
    std::vector<float> cs(static_cast<size_t>(M));
    std::vector<int32_t> cz(static_cast<size_t>(M));
#ifdef _OPENMP
#pragma omp for schedule(dynamic, run)
#endif
    for (int64_t i = 0; i < S; ++i) {
      const int64_t c = i / G, g = i % G;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t k = 0; k < n_grid; ++k) {
          const int64_t j = b * n_grid + k;
          candidate(i, b, k, &cs[j], &cz[j]);
          qp[j] = make_qparam(cs[j], cz[j], bits[b], range_exponent(cs[j], p));
        }
      t->lp_err(w + c * K + g * group_size, (K - g * group_size < group_size ? K - g * group_size : group_size),
                qp.data(), M, p, err.data());
      for (int64_t b = 0; b < B; ++b) {
        int64_t best = 0;
        double best_err = 0.0;
        for (int64_t k = 0; k < n_grid; ++k) {
          const int64_t j = b * n_grid + k;
          const double e = unscale_sum(err[j], p, range_exponent(cs[j], p));
          if (k == 0 || e < best_err) {  // ties keep the lowest index
            best = k;
            best_err = e;
          }
        }
        best_index[b * S + i] = static_cast<int32_t>(best);
        scale[b * S + i] = cs[b * n_grid + best];
        zero_point[b * S + i] = cz[b * n_grid + best];
        lp_err[b * S + i] = best_err;
      }
    }
  }
}

void group_fake_quantize(const float* w, int64_t C, int64_t K, int64_t group_size, const float* scale,
                         const int32_t* zero_point, int bits, int num_threads, float* out) {
  map_groups(w, C, K, group_size, scale, zero_point, bits, num_threads, out, current_table()->fake_quant);
}

void group_quantize(const float* w, int64_t C, int64_t K, int64_t group_size, const float* scale,
                    const int32_t* zero_point, int bits, int num_threads, uint8_t* out) {
  map_groups(w, C, K, group_size, scale, zero_point, bits, num_threads, out, current_table()->quant_u8);
}

void group_quantize(const float* w, int64_t C, int64_t K, int64_t group_size, const float* scale,
                    const int32_t* zero_point, int bits, int num_threads, uint16_t* out) {
  map_groups(w, C, K, group_size, scale, zero_point, bits, num_threads, out, current_table()->quant_u16);
}

void group_dequantize(const uint8_t* codes, int64_t C, int64_t K, int64_t group_size, const float* scale,
                      const int32_t* zero_point, int bits, int num_threads, float* out) {
  map_groups(codes, C, K, group_size, scale, zero_point, bits, num_threads, out, current_table()->dequant_u8);
}

void group_dequantize(const uint16_t* codes, int64_t C, int64_t K, int64_t group_size, const float* scale,
                      const int32_t* zero_point, int bits, int num_threads, float* out) {
  map_groups(codes, C, K, group_size, scale, zero_point, bits, num_threads, out, current_table()->dequant_u16);
}

}  // namespace mixquant

// ================================================================ widening ==
namespace mixquant {
namespace {

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;  // bfloat16 is the top half of a float32
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1fu) {
    u = sign | 0x7f800000u | (mant << 13);  // Inf, or NaN with its payload
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (mant << 13);  // rebias 15 -> 127
  } else {
    const float v = static_cast<float>(mant) * 0x1p-24f;  // zero or subnormal: exact
    std::memcpy(&u, &v, sizeof u);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace

void widen_16(const uint16_t* src, int64_t n, bool bfloat16, int num_threads, float* out) {
  // Chunks of the elementwise kernels; the conversion runs in the core's own
  // threads, so no second thread pool spins beside the table that follows.
  const int64_t chunks = (n + kElemChunk - 1) / kElemChunk;
  const int nt = clamp_threads(num_threads, chunks);
  (void)nt;  // only read by the OpenMP pragma
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t lo = c * kElemChunk, hi = lo + kElemChunk < n ? lo + kElemChunk : n;
    if (bfloat16) {
      for (int64_t i = lo; i < hi; ++i) out[i] = bf16_to_float(src[i]);
    } else {
      for (int64_t i = lo; i < hi; ++i) out[i] = f16_to_float(src[i]);
    }
  }
}

}  // namespace mixquant
