// Shared declarations between the baseline code and the per-ISA kernel files.
//
// This header is included by translation units compiled with different ISA
// flags (baseline, -mavx2, -mavx512*).  It therefore must only contain plain
// data types and declarations: no inline function bodies, no templates with
// code.  An inline function defined here would be emitted as a COMDAT in
// every TU and the linker could keep the AVX-512 copy for baseline callers
// (the "bitsandbytes trap").
#pragma once

#include <cstdint>

namespace mixquant {

enum class SimdLevel : int { Scalar = 0, AVX2 = 1, AVX512 = 2 };

// Quantization parameters of one (scale, zero_point, bits) triple, already
// converted to the form the kernels use.  With r = nearbyint(w * inv):
//   w_hat = clamp(r, tlo, thi) * scale,  tlo = -zp, thi = qmax - zp
//   code  = clamp(r, tlo, thi) + zp
// which is bit-identical to torch's (clamp(r + zp, 0, qmax) - zp) * scale
// (see kernels_impl.h for the argument).
struct QParam {
  float inv;    // 1.0f / scale, float32 division (torch's formula)
  float scale;
  float tlo;    // -zero_point
  float thi;    // qmax - zero_point
  float zp;     // zero_point as float (exact, <= 65535)
  // 1, or an exact power of two 2^-E: errors are multiplied by it before
  // e^2 / |e|^p is accumulated in float, so that tiny (1e-30) or huge (1e30)
  // weights neither underflow nor overflow; the drivers multiply the sums
  // back by 2^(p*E).  Max |e| is never scaled.
  float escale;
  // 1, or 0 when the driver has proved that nearbyint(w * inv) stays within
  // [tlo, thi] for every w the kernel will see (then the clamp is a no-op and
  // err_stats skips it).  Only err_stats reads it; every other kernel clamps.
  int32_t clamp;
};

// One table per SIMD level.  All functions are single-threaded and work on a
// contiguous range of n elements; threading lives in the baseline drivers.
struct KernelTable {
  const char* name;
  // lo/hi over finite values (lo = +inf, hi = -inf if none), count of NaN/Inf.
  void (*minmax)(const float* x, int64_t n, float* lo, float* hi, int64_t* nonfinite);
  // For each of m parameter sets: sse[j] = sum e^2 (double), maxabs[j] = max |e|;
  // and, unless energy is null, *energy = sum (x * energy_escale)^2 (double).
  // While computing, the pf_n floats at pf (may be null) are prefetched into
  // L2: the caller's next row arrives while this one is being evaluated.
  void (*err_stats)(const float* x, int64_t n, const QParam* qp, int64_t m,
                    double* sse, float* maxabs, float energy_escale, double* energy,
                    const float* pf, int64_t pf_n);
  // For each of m parameter sets: out[j] = sum |e|^p (double); p > 0.
  void (*lp_err)(const float* x, int64_t n, const QParam* qp, int64_t m, double p,
                 double* out);
  // For each of m parameter sets: out[j] = sum (v * vscale) * e^2 (double), v >= 0 laid
  // out like x, errors range-scaled by escale as in err_stats.
  void (*wsse)(const float* x, const float* v, int64_t n, const QParam* qp, int64_t m,
               float vscale, double* out);
  void (*fake_quant)(const float* x, int64_t n, const QParam* qp, float* out);
  void (*quant_u8)(const float* x, int64_t n, const QParam* qp, uint8_t* out);
  void (*quant_u16)(const float* x, int64_t n, const QParam* qp, uint16_t* out);
  void (*dequant_u8)(const uint8_t* q, int64_t n, const QParam* qp, float* out);
  void (*dequant_u16)(const uint16_t* q, int64_t n, const QParam* qp, float* out);
  // n codes of `bits` bits (1..16) from an LSB-first bit stream whose first
  // code starts at bit 0 of packed[0]; reads exactly ceil(n * bits / 8) bytes.
  void (*unpack_u16)(const uint8_t* packed, int64_t n, int bits, uint16_t* out);
  // Dot products of packed codes with nx (1..4) float vectors, block by block,
  // for m rows: row q is the n codes at indices [i0 + q * n, i0 + (q + 1) * n)
  // of the LSB-first stream at `packed` (`bits` bits each, any i0; no byte at
  // or past `end` is read); block b of a row holds its codes [b * block,
  // (b + 1) * block) (the last one possibly short), and
  // out[(q * nb + b) * nx + r] = sum over the block of code_j * x[r * ldx + j]
  // (nb = ceil(n / block)).  Sums are float32 partial sums of at most
  // kDotTerms terms each, added in double; codes are never turned into weights.
  // xbuf: scratch for nx * n floats that the caller keeps, with *xready (0 at
  // first), across calls with the same x: the kernel may leave a reordered copy
  // of x there and set *xready to reuse it.
  void (*code_dot)(const uint8_t* packed, const uint8_t* end, int64_t i0, int64_t m, int64_t n, int64_t block,
                   int bits, const float* x, int64_t ldx, int64_t nx, float* xbuf, int* xready, double* out);
};

// Terms per float32 partial sum of code_dot before it is added into a double
// (each such sum carries at most 64 roundings: the bound the tests check).
constexpr int64_t kDotTerms = 64;
constexpr int64_t kDotMaxRows = 4;

// Defined in kernels_<isa>.cpp (only the ones CMake compiled).
extern const KernelTable kTableScalar;
#ifdef MIXQUANT_HAVE_AVX2
extern const KernelTable kTableAvx2;
#endif
#ifdef MIXQUANT_HAVE_AVX512
extern const KernelTable kTableAvx512;
#endif

// dispatch.cpp (baseline ISA).
const char* simd_level_name(SimdLevel level);
bool parse_simd_level(const char* name, SimdLevel* out);
bool simd_level_supported(SimdLevel level);   // compiled in and runnable on this CPU
SimdLevel best_simd_level();
SimdLevel current_simd_level();              // the calling thread's override, else the default
SimdLevel default_simd_level();              // the process default
bool set_simd_level(SimdLevel level);         // the process default; false if unsupported
bool set_thread_simd_level(SimdLevel level);  // the calling thread's override; false if unsupported
void clear_thread_simd_level();
void init_simd_from_env();                    // reads MIXQUANT_SIMD once at import
const KernelTable* current_table();

}  // namespace mixquant
