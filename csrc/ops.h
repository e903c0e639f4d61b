// The C++ core API: raw pointers, 64-bit sizes, explicit thread counts.
// All arguments are assumed validated (see bindings.cpp); matrices are
// row-major [C, K] (row = output channel).  S is 1 (per-tensor parameters)
// or C (per-channel).
#pragma once

#include <cstdint>

namespace mixquant {

bool openmp_enabled();

// scale/zero_point from a raw range (semantics documented in ops.cpp).
void qparams_one(float lo, float hi, int bits, bool symmetric, float* scale, int32_t* zero_point);

void channel_minmax(const float* w, int64_t C, int64_t K, int num_threads, float* lo, float* hi,
                    int64_t* n_nonfinite);

void qparams(const float* lo, const float* hi, int64_t n, int bits, bool symmetric, float* scale,
             int32_t* zero_point);

// scale/zero_point: [B, S]; sse/max_abs: [B, C].
void error_table(const float* w, int64_t C, int64_t K, const float* scale, const int32_t* zero_point,
                 int64_t S, const int32_t* bits, int64_t B, int num_threads, double* sse,
                 float* max_abs);

// energy[c] = sum of w[c, :]^2 in double (range-scaled float blocks, like the
// error sums); lo/hi [C] bound each row's values.
void row_energy(const float* w, int64_t C, int64_t K, const float* lo, const float* hi,
                int num_threads, double* energy);

// The error table of the min/max quantizers of every bit-width (qparams of the
// finite range of each row, or of the whole matrix) and the energy sum w^2 of
// every row, in one call: one pass over memory per channel when per_channel.
// Outputs: lo/hi [C] (finite range of each row), scale/zero_point [B, S],
// sse/max_abs [B, C], energy [C].  With n_nonfinite > 0 everything but lo/hi
// is zero and callers must refuse the tensor.
void minmax_error_table(const float* w, int64_t C, int64_t K, const int32_t* bits, int64_t B,
                        bool per_channel, bool symmetric, int num_threads, float* lo, float* hi,
                        float* scale, int32_t* zero_point, double* sse, float* max_abs,
                        double* energy, int64_t* n_nonfinite);

// Weighted error table: wsse[b, c] = sum_k v[c, k] * (w[c, k] - w_hat[c, k])^2 (double) for
// the parameters scale/zero_point [B, S].  v is [C, K] (v_per_row) or one [K] vector for every
// row; v >= 0 and finite, vmax its largest value (the kernel scales v by a power of two so that
// no product overflows float).
void weighted_error_table(const float* w, int64_t C, int64_t K, const float* v, bool v_per_row,
                          float vmax, const float* scale, const int32_t* zero_point, int64_t S,
                          const int32_t* bits, int64_t B, int num_threads, double* wsse);

// Largest value of v[0, n), and whether every value is finite and >= 0.
bool weights_ok(const float* v, int64_t n, int num_threads, float* vmax);

// lo/hi: [S]; outputs: [B, S].
void clip_search(const float* w, int64_t C, int64_t K, const float* lo, const float* hi, int64_t S,
                 const int32_t* bits, int64_t B, bool symmetric, int64_t n_grid, double step,
                 double p, int num_threads, int32_t* best_index, float* scale,
                 int32_t* zero_point, double* lp_err);

// Bytes of working memory clip_search allocates for these arguments (the
// per-candidate error sums of every group and chunk, and per-thread candidate
// parameters); the binding refuses calls that would need more than it allows.
int64_t clip_search_scratch_bytes(int64_t C, int64_t K, int64_t S, int64_t B, int64_t n_grid,
                                  int num_threads);

void fake_quantize(const float* w, int64_t C, int64_t K, const float* scale,
                   const int32_t* zero_point, int64_t S, int bits, int num_threads, float* out);
void quantize(const float* w, int64_t C, int64_t K, const float* scale, const int32_t* zero_point,
              int64_t S, int bits, int num_threads, uint8_t* out);
void quantize(const float* w, int64_t C, int64_t K, const float* scale, const int32_t* zero_point,
              int64_t S, int bits, int num_threads, uint16_t* out);
void dequantize(const uint8_t* codes, int64_t C, int64_t K, const float* scale,
                const int32_t* zero_point, int64_t S, int bits, int num_threads, float* out);
void dequantize(const uint16_t* codes, int64_t C, int64_t K, const float* scale,
                const int32_t* zero_point, int64_t S, int bits, int num_threads, float* out);

// Unpack-and-dequantize: n = A * C * R codes packed LSB-first at `bits` (the
// layout of pack_bits) become float32 (code - zp) * scale.  Element (a, c, r)
// sits at flat index (a * C + c) * R + r; its parameters are those of block
// r / block of channel c: scale/zero_point[c * G + r / block], G = ceil(R /
// block).  Per channel: block = R; per tensor: C = 1, block = R = n.  `packed`
// holds at least packed_bytes(n, bits) bytes; 1 <= block <= R.
void unpack_dequantize(const uint8_t* packed, int bits, int64_t A, int64_t C, int64_t R, int64_t block,
                       const float* scale, const int32_t* zero_point, int num_threads, float* out);

// Packed matrix times vectors: y[r, c] = sum_k (code[c, k] - zp[i]) * scale[i] * x[r, k]
// for the [C, K] matrix of codes packed LSB-first at `bits` (row-major, the
// layout of pack_bits), x [N, K] and y [N, C] row-major.  i = c * G + k / block
// (G = ceil(K / block)) when S = C * G parameter sets are given, 0 when S = 1
// (per tensor).  Per block it computes scale * (sum code * x - zp * sum x):
// the first sum in float32 partial sums of at most kDotTerms terms added in
// double, the rest in double, one rounding to float32 at the end.  Rows are
// independent, so the result does not depend on num_threads.  K >= 1,
// 1 <= block <= K, `packed` holds packed_bytes(C * K, bits) bytes.
void packed_matvec(const uint8_t* packed, int bits, int64_t C, int64_t K, int64_t block, const float* scale,
                   const int32_t* zero_point, int64_t S, const float* x, int64_t N, int num_threads, float* y);

// Largest code in the array (used to validate codes against 2^bits - 1).
uint32_t max_code(const uint8_t* codes, int64_t n);
uint32_t max_code(const uint16_t* codes, int64_t n);

// LSB-first bit stream: code j occupies bits [j*b, (j+1)*b) of the
// little-endian stream.  packed_bytes(n, b) = ceil(n * b / 8).
int64_t packed_bytes(int64_t n, int bits);
// Return false (and leave out partially written) if a code is >= 2^bits.
bool pack_bits(const uint8_t* codes, int64_t n, int bits, uint8_t* out);
bool pack_bits(const uint16_t* codes, int64_t n, int bits, uint8_t* out);
// `packed` must hold at least packed_bytes(n, bits) bytes.
void unpack_bits(const uint8_t* packed, int64_t n, int bits, uint8_t* out);
void unpack_bits(const uint8_t* packed, int64_t n, int bits, uint16_t* out);

// ---- Group-wise quantizers.  A row of K weights is cut into
// G = group_count(K, gs) groups of gs consecutive elements, the last one
// possibly short; each group has its own (scale, zero point), stored as
// [.., C * G] in (row, group) order.  Scales are rounded up to the nearest
// bfloat16 (the dtype they are stored in) and zero points are computed from
// the rounded scale: group_qparams is qparams followed by that rounding.
int64_t group_count(int64_t K, int64_t group_size);
void group_qparams(const float* lo, const float* hi, int64_t n, int bits, bool symmetric, float* scale,
                   int32_t* zero_point);
// lo/hi: [C * G] over finite values (a group without any gives (0, 0)).
void group_minmax(const float* w, int64_t C, int64_t K, int64_t group_size, int num_threads, float* lo,
                  float* hi, int64_t* n_nonfinite);
// minmax_error_table for groups: lo/hi [C * G], scale/zero_point [B, C * G],
// sse/max_abs [B, C] (per row, groups summed in order), energy [C].
void group_minmax_error_table(const float* w, int64_t C, int64_t K, int64_t group_size,
                              const int32_t* bits, int64_t B, bool symmetric, int num_threads,
                              float* lo, float* hi, float* scale, int32_t* zero_point, double* sse,
                              float* max_abs, double* energy, int64_t* n_nonfinite);
// error_table for groups: scale/zero_point [B, C * G]; sse/max_abs [B, C].
void group_error_table(const float* w, int64_t C, int64_t K, int64_t group_size, const float* scale,
                       const int32_t* zero_point, const int32_t* bits, int64_t B, int num_threads,
                       double* sse, float* max_abs);
// clip_search with one group per segment: lo/hi [C * G]; outputs [B, C * G].
void group_clip_search(const float* w, int64_t C, int64_t K, int64_t group_size, const float* lo,
                       const float* hi, const int32_t* bits, int64_t B, bool symmetric, int64_t n_grid,
                       double step, double p, int num_threads, int32_t* best_index, float* scale,
                       int32_t* zero_point, double* lp_err);
int64_t group_clip_search_scratch_bytes(int64_t C, int64_t K, int64_t group_size, int64_t B,
                                        int64_t n_grid, int num_threads);
// Element-wise ops with scale/zero_point [C * G].
void group_fake_quantize(const float* w, int64_t C, int64_t K, int64_t group_size, const float* scale,
                         const int32_t* zero_point, int bits, int num_threads, float* out);
void group_quantize(const float* w, int64_t C, int64_t K, int64_t group_size, const float* scale,
                    const int32_t* zero_point, int bits, int num_threads, uint8_t* out);
void group_quantize(const float* w, int64_t C, int64_t K, int64_t group_size, const float* scale,
                    const int32_t* zero_point, int bits, int num_threads, uint16_t* out);
void group_dequantize(const uint8_t* codes, int64_t C, int64_t K, int64_t group_size, const float* scale,
                      const int32_t* zero_point, int bits, int num_threads, float* out);
void group_dequantize(const uint16_t* codes, int64_t C, int64_t K, int64_t group_size, const float* scale,
                      const int32_t* zero_point, int bits, int num_threads, float* out);

// float32 values of n bfloat16 (or IEEE float16) bit patterns, exactly.
void widen_16(const uint16_t* src, int64_t n, bool bfloat16, int num_threads, float* out);

}  // namespace mixquant
