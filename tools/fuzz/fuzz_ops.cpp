// libFuzzer harness for the raw C++ core (csrc/ops.h).
//
// Every input is decoded into a small problem (matrix shape, bit-widths,
// per-tensor or per-channel parameters, thread count, SIMD level, weights
// drawn from a mix of raw float bit patterns, NaN/Inf, denormals, huge and
// tiny magnitudes) and every op is run on it.  Besides the sanitizers
// (address, undefined, float-cast-overflow), the harness checks properties
// against a naive scalar model of the documented formulas:
//
//   channel_minmax  exact min/max over finite values and the non-finite count
//   qparams         scale in [FLT_MIN, FLT_MAX], zero point in [0, qmax]
//   fake_quantize   bit-exact with  clamp(nearbyint(w * (1/scale)), -zp, qmax - zp) * scale
//                   (NaN -> lower bound), equal on every SIMD level
//   quantize        codes <= qmax, dequantize(quantize(w)) == fake_quantize(w)
//   error_table     max_abs exact, sse within 1e-5 relative of a double sum
//   minmax_error_table  equal to channel_minmax + qparams + error_table, energy
//                   within 1e-5 of a double sum, non-finite values counted
//   row_energy      within 1e-5 of a double sum
//   clip_search     index in range, chosen error within 2e-5 of the naive
//                   Lp error of that candidate and no worse than the best naive one
//   pack/unpack     round trip; any byte stream unpacks to codes < 2^bits;
//                   unpack_dequantize equals unpack + the dequantize formula
//
// Unvalidated inputs the binding never passes (NaN weights to the reductions)
// are still run, for memory and UB safety only.
//
// Build: tools/fuzz/build_fuzzer.sh; run: tools/fuzz/run_fuzzer.sh SECONDS.
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "ops.h"
#include "simd.h"

using namespace mixquant;

namespace {

class Reader {
 public:
  Reader(const uint8_t* d, size_t n) : d_(d), n_(n) {}
  uint8_t u8() { return i_ < n_ ? d_[i_++] : 0; }
  uint16_t u16() { return static_cast<uint16_t>(u8() | (u8() << 8)); }
  uint32_t u32() { return static_cast<uint32_t>(u16()) | (static_cast<uint32_t>(u16()) << 16); }
  bool empty() const { return i_ >= n_; }
  size_t pos() const { return i_; }
  size_t size() const { return n_; }
  const uint8_t* data() const { return d_; }

 private:
  const uint8_t* d_;
  size_t n_;
  size_t i_ = 0;
};

[[noreturn]] void die(const char* what, double a, double b, int64_t where) {
  std::fprintf(stderr, "PROPERTY VIOLATION: %s (%.17g vs %.17g at %lld)\n", what, a, b,
               static_cast<long long>(where));
  std::abort();
}

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

const float kSpecials[] = {0.0f,      -0.0f,     NAN,       INFINITY, -INFINITY, FLT_MIN,
                           -FLT_MIN,  1e-45f,    -1e-45f,   FLT_MAX,  -FLT_MAX,  1e-30f,
                           -1e30f,    1e30f,     0.5f,      -0.5f,    1.5f,      2.5f,
                           1e-39f,    3.4e37f,   -7e-20f,   65535.f,  8388608.f, -8388609.f};

// One weight value: the style byte picks raw bits, a special, or a scaled small integer.
float draw(Reader& r, int style) {
  const uint8_t tag = r.u8();
  switch ((style + tag) % 8) {
    case 0:
      return from_bits(r.u32());  // anything, NaN payloads and denormals included
    case 1:
      return kSpecials[r.u8() % (sizeof kSpecials / sizeof kSpecials[0])];
    case 2: {  // huge dynamic range: m * 2^e, e in [-149, 127]
      const int e = static_cast<int>(r.u16() % 277) - 149;
      return std::ldexp(static_cast<float>(static_cast<int8_t>(r.u8())), e);
    }
    default:  // ordinary weights: small integers scaled
      return static_cast<float>(static_cast<int16_t>(r.u16())) * 1e-3f;
  }
}

// Absolute floor of the native error sums: terms are accumulated in float
// (after the exact power-of-two range scaling of ops.cpp), so a term below the
// smallest subnormal, 2^-149, may be lost.  Mirrors range_exponent() there.
double sum_floor(float scale, double p, int64_t terms) {
  const int e = std::ilogb(scale);
  const bool scaled = !(p * (e - 24) > -100.0 && p * (e + 34) < 100.0);
  return static_cast<double>(terms) * std::ldexp(1.0, -149) * (scaled ? std::exp2(p * e) : 1.0);
}

bool same_float(float a, float b) { return a == b || (std::isnan(a) && std::isnan(b)); }

// The documented fake quantization of one value.
float naive_fq(float w, float scale, int32_t zp, int bits) {
  const float inv = 1.0f / scale;
  const float qmax = static_cast<float>((int64_t{1} << bits) - 1);
  const float tlo = -static_cast<float>(zp), thi = qmax - static_cast<float>(zp);
  float t = std::nearbyint(w * inv);
  if (!(t >= tlo)) t = tlo;  // NaN too
  if (t > thi) t = thi;
  return t * scale;
}

std::vector<SimdLevel> levels() {
  std::vector<SimdLevel> out;
  for (int l = 0; l <= 2; ++l)
    if (simd_level_supported(static_cast<SimdLevel>(l))) out.push_back(static_cast<SimdLevel>(l));
  return out;
}

void check_pack(Reader& r) {
  const int bits = 1 + r.u8() % 16;
  const int64_t n = r.u16() % 2000;
  const uint32_t limit = uint32_t{1} << bits;
  std::vector<uint16_t> codes(static_cast<size_t>(n));
  for (auto& c : codes) c = static_cast<uint16_t>(r.u16() % limit);
  std::vector<uint8_t> packed(static_cast<size_t>(packed_bytes(n, bits)) + 1, 0xAB);
  if (!pack_bits(codes.data(), n, bits, packed.data())) die("pack refused valid codes", bits, 0, n);
  if (packed.back() != 0xAB) die("pack wrote past packed_bytes", bits, 0, n);
  std::vector<uint16_t> back(static_cast<size_t>(n));
  unpack_bits(packed.data(), n, bits, back.data());
  for (int64_t i = 0; i < n; ++i)
    if (back[i] != codes[i]) die("unpack(pack(c)) != c", back[i], codes[i], i);
  if (bits <= 8) {
    std::vector<uint8_t> c8(codes.begin(), codes.end()), b8(static_cast<size_t>(n));
    if (!pack_bits(c8.data(), n, bits, packed.data())) die("pack8 refused valid codes", bits, 0, n);
    unpack_bits(packed.data(), n, bits, b8.data());
    for (int64_t i = 0; i < n; ++i)
      if (b8[i] != c8[i]) die("unpack8(pack8(c)) != c", b8[i], c8[i], i);
  }
  // An over-range code is refused.
  if (n > 0 && bits < 16) {
    codes[static_cast<size_t>(r.u16() % n)] = static_cast<uint16_t>(limit);
    if (pack_bits(codes.data(), n, bits, packed.data())) die("pack accepted a code >= 2^bits", bits, 0, n);
  }
  // Arbitrary bytes (exactly packed_bytes long) unpack to in-range codes.
  const int64_t need = packed_bytes(n, bits);
  std::vector<uint8_t> raw(static_cast<size_t>(need));
  for (auto& b : raw) b = r.u8();
  unpack_bits(raw.data(), n, bits, back.data());
  for (int64_t i = 0; i < n; ++i)
    if (back[i] >= limit) die("unpacked code out of range", back[i], limit, i);
  // unpack_dequantize of the same exact-size stream, on every level: the
  // codes above through the documented formula, with blocks along rows.
  const int64_t C = n > 0 && n % 3 == 0 ? 3 : 1, R = n / C;
  const int64_t block = R > 0 ? 1 + r.u16() % R : 1;
  const int64_t G = R > 0 ? (R + block - 1) / block : 1;
  std::vector<float> scale(static_cast<size_t>(C * G));
  std::vector<int32_t> zp(static_cast<size_t>(C * G));
  for (int64_t i = 0; i < C * G; ++i) {
    scale[i] = 1e-3f * static_cast<float>(1 + r.u16());
    zp[i] = static_cast<int32_t>(r.u16() % limit);
  }
  std::vector<float> out(static_cast<size_t>(n));
  for (int l = 0; l <= 2; ++l) {
    if (!simd_level_supported(static_cast<SimdLevel>(l))) continue;
    set_simd_level(static_cast<SimdLevel>(l));
    unpack_dequantize(raw.data(), bits, 1, C, R, block, scale.data(), zp.data(), 1 + l, out.data());
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = (i / R) * G + (i % R) / block;
      const float want = (static_cast<float>(back[i]) - static_cast<float>(zp[p])) * scale[p];
      if (!same_float(out[i], want)) die("unpack_dequantize != unpack + dequantize", l, bits, i);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::vector<SimdLevel> kLevels = levels();
  Reader r(data, size);
  const uint8_t mode = r.u8();
  if (mode % 8 == 7) {
    check_pack(r);
    return 0;
  }
  const SimdLevel level = kLevels[r.u8() % kLevels.size()];
  set_simd_level(level);
  const int64_t C = 1 + r.u8() % 8;
  // Mostly short rows; sometimes rows long enough for the chunked reduction paths.
  int64_t K = r.u16() % 600;
  if (mode % 16 == 3) K = 32768 + r.u16() % 40000;
  const bool per_channel = (mode >> 4) & 1;
  const bool symmetric = (mode >> 5) & 1;
  const bool allow_nonfinite = (mode >> 6) & 1;
  const int nt = 1 + r.u8() % 4;
  const int style = r.u8() % 8;
  const int64_t n = C * K;
  std::vector<float> w(static_cast<size_t>(n));
  // Long rows repeat the drawn pattern so that the input stays small.
  const int64_t distinct = n < 4096 ? n : 4096;
  for (int64_t i = 0; i < distinct; ++i) {
    float v = draw(r, style);
    if (!allow_nonfinite && !std::isfinite(v)) v = 0.0f;
    w[i] = v;
  }
  for (int64_t i = distinct; i < n; ++i) w[i] = w[i % distinct] * (i % 3 == 0 ? -1.0f : 1.0f);

  // ---- channel_minmax
  if (K > 0) {
    std::vector<float> lo(C), hi(C);
    int64_t bad = -1;
    channel_minmax(w.data(), C, K, nt, lo.data(), hi.data(), &bad);
    int64_t nbad = 0;
    for (int64_t c = 0; c < C; ++c) {
      float l = INFINITY, h = -INFINITY;
      for (int64_t k = 0; k < K; ++k) {
        const float v = w[c * K + k];
        if (!std::isfinite(v)) {
          ++nbad;
          continue;
        }
        l = v < l ? v : l;
        h = v > h ? v : h;
      }
      if (l > h) l = h = 0.0f;
      if (!(lo[c] == l && hi[c] == h)) die("channel_minmax", lo[c], l, c);
    }
    if (bad != nbad) die("non-finite count", static_cast<double>(bad), static_cast<double>(nbad), 0);
  }

  // Ranges for the parameters: finite by construction (as the binding requires).
  std::vector<float> lo(C), hi(C);
  for (int64_t c = 0; c < C; ++c) {
    float l = 0.0f, h = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const float v = w[c * K + k];
      if (std::isfinite(v)) {
        l = v < l ? v : l;
        h = v > h ? v : h;
      }
    }
    lo[c] = l;
    hi[c] = h;
  }
  const int64_t S = per_channel ? C : 1;
  if (!per_channel) {
    for (int64_t c = 1; c < C; ++c) {
      lo[0] = lo[c] < lo[0] ? lo[c] : lo[0];
      hi[0] = hi[c] > hi[0] ? hi[c] : hi[0];
    }
  }

  // ---- qparams for B bit-widths
  const int64_t B = 1 + r.u8() % 4;
  std::vector<int32_t> bits(B);
  for (auto& b : bits) b = 1 + r.u8() % 16;
  std::vector<float> scale(B * S);
  std::vector<int32_t> zp(B * S);
  for (int64_t b = 0; b < B; ++b) {
    qparams(lo.data(), hi.data(), S, bits[b], symmetric, scale.data() + b * S, zp.data() + b * S);
    const int64_t qmax = (int64_t{1} << bits[b]) - 1;
    for (int64_t s = 0; s < S; ++s) {
      const float sc = scale[b * S + s];
      if (!(sc >= FLT_MIN && sc <= FLT_MAX)) die("qparams scale out of range", sc, 0, s);
      if (zp[b * S + s] < 0 || zp[b * S + s] > qmax) die("qparams zero point", zp[b * S + s], qmax, s);
      if (symmetric && zp[b * S + s] != (int32_t{1} << (bits[b] - 1))) die("symmetric zp", zp[b * S + s], 0, s);
    }
  }

  // ---- elementwise ops at the first bit-width, on every SIMD level
  const int b0 = bits[0];
  const float* sc0 = scale.data();
  const int32_t* zp0 = zp.data();
  std::vector<float> fq(n), fq_other(n), dq(n);
  fake_quantize(w.data(), C, K, sc0, zp0, S, b0, nt, fq.data());
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = per_channel ? i / (K > 0 ? K : 1) : 0;
    const float want = naive_fq(w[i], sc0[s], zp0[s], b0);
    if (!same_float(fq[i], want)) die("fake_quantize vs naive formula", fq[i], want, i);
  }
  const int64_t qmax0 = (int64_t{1} << b0) - 1;
  if (b0 <= 8) {
    std::vector<uint8_t> q(n);
    quantize(w.data(), C, K, sc0, zp0, S, b0, nt, q.data());
    for (int64_t i = 0; i < n; ++i)
      if (q[i] > qmax0) die("code > qmax", q[i], static_cast<double>(qmax0), i);
    if (n > 0 && max_code(q.data(), n) > static_cast<uint32_t>(qmax0)) die("max_code", 0, 0, 0);
    dequantize(q.data(), C, K, sc0, zp0, S, b0, nt, dq.data());
  } else {
    std::vector<uint16_t> q(n);
    quantize(w.data(), C, K, sc0, zp0, S, b0, nt, q.data());
    for (int64_t i = 0; i < n; ++i)
      if (q[i] > qmax0) die("code > qmax", q[i], static_cast<double>(qmax0), i);
    dequantize(q.data(), C, K, sc0, zp0, S, b0, nt, dq.data());
  }
  for (int64_t i = 0; i < n; ++i)
    if (!(dq[i] == fq[i])) die("dequantize(quantize(w)) != fake_quantize(w)", dq[i], fq[i], i);
  for (SimdLevel other : kLevels) {
    if (other == level) continue;
    set_simd_level(other);
    fake_quantize(w.data(), C, K, sc0, zp0, S, b0, 1 + (nt % 3), fq_other.data());
    for (int64_t i = 0; i < n; ++i)
      if (!same_float(fq_other[i], fq[i])) die("fake_quantize differs across SIMD levels", fq_other[i], fq[i], i);
  }
  set_simd_level(level);
  if (K == 0) return 0;

  // ---- error_table (any input; properties checked on finite weights only)
  bool finite = true;
  for (float v : w) finite = finite && std::isfinite(v);
  std::vector<double> sse(B * C);
  std::vector<float> max_abs(B * C);
  error_table(w.data(), C, K, scale.data(), zp.data(), S, bits.data(), B, nt, sse.data(), max_abs.data());
  if (finite) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c) {
        const float s = scale[b * S + (per_channel ? c : 0)];
        const int32_t z = zp[b * S + (per_channel ? c : 0)];
        double want = 0.0;
        float mx = 0.0f;
        for (int64_t k = 0; k < K; ++k) {
          const float x = w[c * K + k];
          const float e = x - naive_fq(x, s, z, bits[b]);
          want += static_cast<double>(e) * static_cast<double>(e);
          mx = std::fabs(e) > mx ? std::fabs(e) : mx;
        }
        const double got = sse[b * C + c];
        if (!(max_abs[b * C + c] == mx)) die("error_table max_abs", max_abs[b * C + c], mx, b * C + c);
        if (std::isinf(want) || std::isinf(mx)) {
          if (!std::isinf(got)) die("error_table sse should be inf", got, want, b * C + c);
          continue;
        }
        if (!(got >= 0.0) || std::fabs(got - want) > 1e-5 * want + sum_floor(s, 2.0, K))
          die("error_table sse", got, want, b * C + c);
      }
  }

  // ---- minmax_error_table: the fused call equals the two passes above
  {
    std::vector<float> flo(C), fhi(C), fscale(B * S), fmax(B * C);
    std::vector<int32_t> fzp(B * S);
    std::vector<double> fsse(B * C), energy(C);
    int64_t fbad = -1;
    minmax_error_table(w.data(), C, K, bits.data(), B, per_channel, symmetric, nt, flo.data(), fhi.data(),
                       fscale.data(), fzp.data(), fsse.data(), fmax.data(), energy.data(), &fbad);
    int64_t nbad = 0;
    for (float v : w) nbad += std::isfinite(v) ? 0 : 1;
    if (fbad != nbad) die("minmax_error_table non-finite count", fbad, nbad, 0);
    if (finite) {
      for (int64_t j = 0; j < B * S; ++j)
        if (!(fscale[j] == scale[j] && fzp[j] == zp[j])) die("minmax_error_table qparams", fscale[j], scale[j], j);
      for (int64_t j = 0; j < B * C; ++j) {
        if (!(fmax[j] == max_abs[j])) die("minmax_error_table max_abs", fmax[j], max_abs[j], j);
        if (!(fsse[j] == sse[j]) && !(std::isnan(fsse[j]) && std::isnan(sse[j])))
          die("minmax_error_table sse", fsse[j], sse[j], j);
      }
      std::vector<double> renergy(C);
      row_energy(w.data(), C, K, flo.data(), fhi.data(), nt, renergy.data());
      for (int64_t c = 0; c < C; ++c) {
        double want = 0.0;
        for (int64_t k = 0; k < K; ++k) want += static_cast<double>(w[c * K + k]) * w[c * K + k];
        if (!(std::fabs(energy[c] - want) <= 1e-5 * want + 1e-300)) die("minmax_error_table energy", energy[c], want, c);
        if (!(std::fabs(renergy[c] - want) <= 1e-5 * want + 1e-300)) die("row_energy", renergy[c], want, c);
      }
    } else {
      for (int64_t j = 0; j < B * C; ++j)
        if (fsse[j] != 0.0 || fmax[j] != 0.0f) die("minmax_error_table table not cleared", fsse[j], fmax[j], j);
    }
  }

  // ---- clip_search
  const int64_t n_grid = 1 + r.u8() % 24;
  const double step = (r.u8() % 100 + 1) / (100.0 * static_cast<double>(n_grid));
  static const double kP[] = {2.0, 1.0, 2.4, 0.5, 3.7, 1.0 / 3.0, 6.0};
  const double p = kP[r.u8() % (sizeof kP / sizeof kP[0])];
  std::vector<int32_t> best(B * S), czp(B * S);
  std::vector<float> cscale(B * S);
  std::vector<double> lp(B * S);
  clip_search(w.data(), C, K, lo.data(), hi.data(), S, bits.data(), B, symmetric, n_grid, step, p, nt,
              best.data(), cscale.data(), czp.data(), lp.data());
  if (!finite || n > 20000) return 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) {
      const int64_t j = b * S + s;
      if (best[j] < 0 || best[j] >= n_grid) die("clip best_index out of range", best[j], 0, j);
      const float sc = cscale[j];
      if (!(sc >= FLT_MIN && sc <= FLT_MAX)) die("clip scale out of range", sc, 0, j);
      // Naive Lp error of every candidate of this group.
      const float* x = per_channel ? w.data() + s * K : w.data();
      const int64_t len = per_channel ? K : n;
      // Each candidate has its own floor; the widest (smallest-scale one) bounds them all.
      double best_naive = INFINITY, at_chosen = NAN, floor = 0.0;
      const float l0 = lo[s] < 0.0f ? lo[s] : 0.0f, h0 = hi[s] > 0.0f ? hi[s] : 0.0f;
      for (int64_t i = 0; i < n_grid; ++i) {
        const double f = 1.0 - static_cast<double>(i) * step;
        float cs;
        int32_t cz;
        qparams_one(static_cast<float>(l0 * f), static_cast<float>(h0 * f), bits[b], symmetric, &cs, &cz);
        double acc = 0.0;
        for (int64_t k = 0; k < len; ++k) {
          const double e = std::fabs(static_cast<double>(x[k] - naive_fq(x[k], cs, cz, bits[b])));
          acc += p == 2.0 ? e * e : std::pow(e, p);
        }
        if (i == best[j]) {
          at_chosen = acc;
          if (!(cs == sc && cz == czp[j])) die("clip scale/zp != candidate's", cs, sc, j);
        }
        best_naive = acc < best_naive ? acc : best_naive;
        const double fl = sum_floor(cs, p, len);
        floor = fl > floor ? fl : floor;
      }
      if (std::isinf(at_chosen)) continue;  // overflowing grid: nothing to compare
      const double tol = 2e-5 * at_chosen + floor;
      if (!(std::fabs(lp[j] - at_chosen) <= tol)) die("clip lp_err vs naive", lp[j], at_chosen, j);
      if (!(at_chosen <= best_naive * (1.0 + 4e-5) + 2.0 * floor)) die("clip not optimal", at_chosen, best_naive, j);
    }
  return 0;
}
