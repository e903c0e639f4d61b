// pybind11 module mixquant._core: validate, release the GIL, call the core.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "quant_limits.h"
#include "ops.h"
#include "simd.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;
using I64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using U8 = py::array_t<uint8_t, py::array::c_style>;
using U16 = py::array_t<uint16_t, py::array::c_style>;

[[noreturn]] void fail(const std::string& msg) { throw py::value_error(msg); }

namespace lim = mixquant::limits;

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) {
    if (d) s += ", ";
    s += std::to_string(a.shape(d));
  }
  return s + (a.ndim() == 1 ? ",)" : ")");
}

char dtype_kind(py::handle obj) {
  if (py::isinstance<py::array>(obj)) return py::reinterpret_borrow<py::array>(obj).dtype().kind();
  return 0;
}

// Real numbers as float32 C-contiguous (zero copy when already so).
F32 as_f32(py::handle obj, const char* name) {
  const char k = dtype_kind(obj);
  if (k != 0 && k != 'f' && k != 'i' && k != 'u')
    fail(std::string(name) + " must be a real (float) array");
  F32 a = F32::ensure(obj);
  if (!a) fail(std::string(name) + " must be convertible to a float32 array");
  return a;
}

// Integers as int64 C-contiguous; float arrays are refused (no silent truncation).
I64 as_i64(py::handle obj, const char* name) {
  const char k = dtype_kind(obj);
  if (k != 0 && k != 'i' && k != 'u') fail(std::string(name) + " must be an integer array");
  I64 a = I64::ensure(obj);
  if (!a) fail(std::string(name) + " must be convertible to an int64 array");
  if (k == 0) {
    // A Python list: make sure nothing was a float.
    py::array probe = py::array::ensure(obj);
    if (!probe || (probe.dtype().kind() != 'i' && probe.dtype().kind() != 'u' && probe.size() > 0))
      fail(std::string(name) + " must contain integers");
  }
  return a;
}

void check_ndim(const py::array& a, int ndim, const char* name) {
  if (a.ndim() != ndim)
    fail(std::string(name) + " must be " + std::to_string(ndim) + "-D, got shape " + shape_str(a));
}

int check_bits(int64_t bits, const char* name = "bits") {
  if (bits < lim::kMinBits || bits > lim::kMaxBits)
    fail(std::string(name) + " must be in " + std::to_string(lim::kMinBits) + ".." +
         std::to_string(lim::kMaxBits) + ", got " + std::to_string(bits));
  return static_cast<int>(bits);
}

int check_threads(int64_t nt) {
  if (nt < 1) fail("num_threads must be >= 1, got " + std::to_string(nt));
  return nt > 1024 ? 1024 : static_cast<int>(nt);
}

F32 weight_arg(py::handle obj, bool allow_empty, int64_t* C, int64_t* K) {
  F32 w = as_f32(obj, "w");
  check_ndim(w, 2, "w");
  *C = w.shape(0);
  *K = w.shape(1);
  if (!allow_empty && (*C == 0 || *K == 0))
    fail("w must have at least one row and one column, got shape " + shape_str(w));
  return w;
}

int64_t check_groups(int64_t S, int64_t C, const char* name) {
  if (S != 1 && S != C)
    fail(std::string(name) + " must have 1 (per-tensor) or C=" + std::to_string(C) +
         " (per-channel) entries, got " + std::to_string(S));
  return S;
}

void check_scales(const float* s, int64_t n, const char* name) {
  for (int64_t i = 0; i < n; ++i)
    if (!(s[i] >= FLT_MIN && s[i] <= FLT_MAX))
      fail(std::string(name) + " must be finite and >= FLT_MIN (1.1754944e-38), got " +
           std::to_string(s[i]) + " at index " + std::to_string(i));
}

std::vector<int32_t> zero_points(const I64& z, const std::vector<int>& bits_per_row, int64_t S,
                                 const char* name) {
  // z is [len(bits_per_row), S]; zero points must lie in [0, 2^bits - 1].
  std::vector<int32_t> out(static_cast<size_t>(z.size()));
  const int64_t* p = z.data();
  for (int64_t i = 0; i < z.size(); ++i) {
    const int64_t qmax = (int64_t{1} << bits_per_row[i / S]) - 1;
    if (p[i] < 0 || p[i] > qmax)
      fail(std::string(name) + " must be in [0, 2**bits - 1] = [0, " + std::to_string(qmax) +
           "], got " + std::to_string(p[i]) + " at flat index " + std::to_string(i));
    out[i] = static_cast<int32_t>(p[i]);
  }
  return out;
}

void check_finite(const float* x, int64_t n, const char* name) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i]))
      fail(std::string(name) + " must be finite, got " + std::to_string(x[i]) + " at index " +
           std::to_string(i));
}

// Per-tensor or per-channel (scale, zero_point) 1-D pair for the elementwise ops.
struct Params1D {
  F32 scale;
  std::vector<int32_t> zp;
  int64_t S;
};

Params1D params_1d(py::handle scale_obj, py::handle zp_obj, int bits, int64_t C) {
  Params1D p;
  p.scale = as_f32(scale_obj, "scale");
  I64 z = as_i64(zp_obj, "zero_point");
  if (p.scale.ndim() > 1) check_ndim(p.scale, 1, "scale");
  if (z.ndim() > 1) check_ndim(z, 1, "zero_point");
  p.S = check_groups(p.scale.size(), C, "scale");
  if (z.size() != p.S)
    fail("zero_point must have the same length as scale (" + std::to_string(p.S) + "), got " +
         std::to_string(z.size()));
  check_scales(p.scale.data(), p.S, "scale");
  p.zp = zero_points(z, std::vector<int>(1, bits), p.S > 0 ? p.S : 1, "zero_point");
  return p;
}

py::dict limits_dict() {
  py::dict d;
  d["min_bits"] = lim::kMinBits;
  d["max_bits"] = lim::kMaxBits;
  d["min_act_bits"] = lim::kMinActBits;
  d["max_act_bits"] = lim::kMaxActBits;
  d["max_n_grid"] = lim::kMaxNGrid;
  d["max_clip_scratch_bytes"] = lim::kMaxClipScratchBytes;
  return d;
}

py::bool_ clip_grid_ok(int64_t n_grid, double step) { return lim::clip_grid_ok(n_grid, step); }

py::str simd_level() { return mixquant::simd_level_name(mixquant::current_simd_level()); }

py::list supported_simd_levels() {
  py::list out;
  for (int l = 0; l <= static_cast<int>(mixquant::SimdLevel::AVX512); ++l) {
    const auto level = static_cast<mixquant::SimdLevel>(l);
    if (mixquant::simd_level_supported(level)) out.append(mixquant::simd_level_name(level));
  }
  return out;
}

mixquant::SimdLevel parse_supported_level(const std::string& name) {
  mixquant::SimdLevel level;
  if (!mixquant::parse_simd_level(name.c_str(), &level))
    fail("unknown SIMD level '" + name + "' (expected 'scalar', 'avx2' or 'avx512')");
  if (!mixquant::simd_level_supported(level))
    fail("SIMD level '" + name + "' is not supported by this CPU or build");
  return level;
}

void set_simd_level(const std::string& name) { mixquant::set_simd_level(parse_supported_level(name)); }

void set_thread_simd_level(const std::optional<std::string>& name) {
  if (!name) {
    mixquant::clear_thread_simd_level();
    return;
  }
  mixquant::set_thread_simd_level(parse_supported_level(*name));
}

py::str default_simd_level() { return mixquant::simd_level_name(mixquant::default_simd_level()); }

py::tuple channel_minmax(py::object w_obj, int64_t num_threads) {
  int64_t C, K;
  F32 w = weight_arg(w_obj, false, &C, &K);
  const int nt = check_threads(num_threads);
  py::array_t<float> lo(C), hi(C);
  int64_t bad = 0;
  {
    py::gil_scoped_release release;
    mixquant::channel_minmax(w.data(), C, K, nt, lo.mutable_data(), hi.mutable_data(), &bad);
  }
  return py::make_tuple(lo, hi, bad);
}

py::tuple qparams(py::object lo_obj, py::object hi_obj, int64_t bits, bool symmetric) {
  F32 lo = as_f32(lo_obj, "lo"), hi = as_f32(hi_obj, "hi");
  check_ndim(lo, 1, "lo");
  check_ndim(hi, 1, "hi");
  if (lo.size() != hi.size())
    fail("lo and hi must have the same length, got " + std::to_string(lo.size()) + " and " +
         std::to_string(hi.size()));
  const int b = check_bits(bits);
  const int64_t n = lo.size();
  check_finite(lo.data(), n, "lo");
  check_finite(hi.data(), n, "hi");
  py::array_t<float> scale(n);
  py::array_t<int32_t> zp(n);
  {
    py::gil_scoped_release release;
    mixquant::qparams(lo.data(), hi.data(), n, b, symmetric, scale.mutable_data(), zp.mutable_data());
  }
  return py::make_tuple(scale, zp);
}

std::vector<int> bits_list(py::handle obj) {
  I64 bits = as_i64(obj, "bits");
  check_ndim(bits, 1, "bits");
  if (bits.size() == 0) fail("bits must not be empty");
  std::vector<int> out;
  for (int64_t i = 0; i < bits.size(); ++i) out.push_back(check_bits(bits.data()[i], "bits"));
  return out;
}

py::tuple error_table(py::object w_obj, py::object scale_obj, py::object zp_obj, py::object bits_obj,
                      int64_t num_threads) {
  int64_t C, K;
  F32 w = weight_arg(w_obj, false, &C, &K);
  const std::vector<int> bits = bits_list(bits_obj);
  const int64_t B = static_cast<int64_t>(bits.size());
  F32 scale = as_f32(scale_obj, "scale");
  I64 z = as_i64(zp_obj, "zero_point");
  check_ndim(scale, 2, "scale");
  check_ndim(z, 2, "zero_point");
  if (scale.shape(0) != B)
    fail("scale must have shape (B, S) with B=len(bits)=" + std::to_string(B) + ", got " +
         shape_str(scale));
  const int64_t S = check_groups(scale.shape(1), C, "scale.shape[1]");
  if (z.shape(0) != B || z.shape(1) != S)
    fail("zero_point must have the same shape as scale " + shape_str(scale) + ", got " +
         shape_str(z));
  check_scales(scale.data(), B * S, "scale");
  const std::vector<int32_t> zp = zero_points(z, bits, S, "zero_point");
  const int nt = check_threads(num_threads);
  py::array_t<double> sse({B, C});
  py::array_t<float> max_abs({B, C});
  {
    py::gil_scoped_release release;
    const std::vector<int32_t> bits32(bits.begin(), bits.end());
    mixquant::error_table(w.data(), C, K, scale.data(), zp.data(), S, bits32.data(), B, nt,
                          sse.mutable_data(), max_abs.mutable_data());
  }
  return py::make_tuple(sse, max_abs);
}

py::array_t<double> weighted_error_table(py::object w_obj, py::object v_obj, py::object scale_obj,
                                         py::object zp_obj, py::object bits_obj, int64_t num_threads) {
  int64_t C, K;
  F32 w = weight_arg(w_obj, false, &C, &K);
  F32 v = as_f32(v_obj, "v");
  const bool per_row = v.ndim() == 2;
  if (!((v.ndim() == 1 && v.shape(0) == K) || (per_row && v.shape(0) == C && v.shape(1) == K)))
    fail("v must have shape (K,) = (" + std::to_string(K) + ",) or (C, K) = (" + std::to_string(C) +
         ", " + std::to_string(K) + "), got " + shape_str(v));
  const std::vector<int> bits = bits_list(bits_obj);
  const int64_t B = static_cast<int64_t>(bits.size());
  F32 scale = as_f32(scale_obj, "scale");
  I64 z = as_i64(zp_obj, "zero_point");
  check_ndim(scale, 2, "scale");
  check_ndim(z, 2, "zero_point");
  if (scale.shape(0) != B)
    fail("scale must have shape (B, S) with B=len(bits)=" + std::to_string(B) + ", got " +
         shape_str(scale));
  const int64_t S = check_groups(scale.shape(1), C, "scale.shape[1]");
  if (z.shape(0) != B || z.shape(1) != S)
    fail("zero_point must have the same shape as scale " + shape_str(scale) + ", got " +
         shape_str(z));
  check_scales(scale.data(), B * S, "scale");
  const std::vector<int32_t> zp = zero_points(z, bits, S, "zero_point");
  const int nt = check_threads(num_threads);
  float vmax = 0.0f;
  bool ok;
  {
    py::gil_scoped_release release;
    ok = mixquant::weights_ok(v.data(), v.size(), nt, &vmax);
  }
  if (!ok) fail("v must be finite and >= 0");
  py::array_t<double> wsse({B, C});
  {
    py::gil_scoped_release release;
    const std::vector<int32_t> bits32(bits.begin(), bits.end());
    mixquant::weighted_error_table(w.data(), C, K, v.data(), per_row, vmax, scale.data(), zp.data(),
                                   S, bits32.data(), B, nt, wsse.mutable_data());
  }
  return wsse;
}

py::array_t<double> row_energy(py::object w_obj, py::object lo_obj, py::object hi_obj,
                               int64_t num_threads) {
  int64_t C, K;
  F32 w = weight_arg(w_obj, false, &C, &K);
  F32 lo = as_f32(lo_obj, "lo"), hi = as_f32(hi_obj, "hi");
  check_ndim(lo, 1, "lo");
  check_ndim(hi, 1, "hi");
  if (lo.size() != C || hi.size() != C)
    fail("lo and hi must have C=" + std::to_string(C) + " entries each, got " +
         std::to_string(lo.size()) + " and " + std::to_string(hi.size()));
  check_finite(lo.data(), C, "lo");
  check_finite(hi.data(), C, "hi");
  const int nt = check_threads(num_threads);
  py::array_t<double> energy(C);
  {
    py::gil_scoped_release release;
    mixquant::row_energy(w.data(), C, K, lo.data(), hi.data(), nt, energy.mutable_data());
  }
  return energy;
}

py::tuple minmax_error_table(py::object w_obj, py::object bits_obj, bool per_channel,
                             bool symmetric, int64_t num_threads) {
  int64_t C, K;
  F32 w = weight_arg(w_obj, false, &C, &K);
  const std::vector<int> bits = bits_list(bits_obj);
  const int64_t B = static_cast<int64_t>(bits.size());
  const int64_t S = per_channel ? C : 1;
  const int nt = check_threads(num_threads);
  py::array_t<float> lo(C), hi(C), scale({B, S}), max_abs({B, C});
  py::array_t<int32_t> zp({B, S});
  py::array_t<double> sse({B, C}), energy(C);
  int64_t bad = 0;
  {
    py::gil_scoped_release release;
    const std::vector<int32_t> bits32(bits.begin(), bits.end());
    mixquant::minmax_error_table(w.data(), C, K, bits32.data(), B, per_channel, symmetric, nt,
                                 lo.mutable_data(), hi.mutable_data(), scale.mutable_data(),
                                 zp.mutable_data(), sse.mutable_data(), max_abs.mutable_data(),
                                 energy.mutable_data(), &bad);
  }
  return py::make_tuple(lo, hi, scale, zp, sse, max_abs, energy, bad);
}

// The clipping grid and norm of clip_search and group_clip_search.
void check_clip_grid(int64_t n_grid, double step, double p) {
  if (n_grid < 1) fail("n_grid must be >= 1, got " + std::to_string(n_grid));
  if (n_grid > lim::kMaxNGrid)
    fail("n_grid must be <= " + std::to_string(lim::kMaxNGrid) + ", got " + std::to_string(n_grid));
  if (!(step > 0.0) || !std::isfinite(step)) fail("step must be > 0, got " + std::to_string(step));
  if (!lim::clip_grid_ok(n_grid, step))
    fail("(n_grid - 1) * step must be < 1 so that every clipping factor 1 - i*step stays > 0, got " +
         std::to_string(static_cast<double>(n_grid - 1) * step));
  if (!(p > 0.0) || !std::isfinite(p)) fail("p must be finite and > 0, got " + std::to_string(p));
}

py::tuple clip_search(py::object w_obj, py::object lo_obj, py::object hi_obj, py::object bits_obj,
                      bool symmetric, int64_t n_grid, double step, double p, int64_t num_threads) {
  int64_t C, K;
  F32 w = weight_arg(w_obj, false, &C, &K);
  F32 lo = as_f32(lo_obj, "lo"), hi = as_f32(hi_obj, "hi");
  if (lo.ndim() > 1) check_ndim(lo, 1, "lo");
  if (hi.ndim() > 1) check_ndim(hi, 1, "hi");
  const int64_t S = check_groups(lo.size(), C, "lo");
  if (hi.size() != S)
    fail("hi must have the same length as lo (" + std::to_string(S) + "), got " +
         std::to_string(hi.size()));
  check_finite(lo.data(), S, "lo");
  check_finite(hi.data(), S, "hi");
  const std::vector<int> bits = bits_list(bits_obj);
  const int64_t B = static_cast<int64_t>(bits.size());
  check_clip_grid(n_grid, step, p);
  const int nt = check_threads(num_threads);
  // The fused search keeps one error sum per candidate, group and chunk: refuse
  // requests whose working memory alone would exhaust the machine.
  const int64_t scratch = mixquant::clip_search_scratch_bytes(C, K, S, B, n_grid, nt);
  if (scratch > lim::kMaxClipScratchBytes)
    fail("clip_search would need " + std::to_string(scratch >> 20) + " MiB of working memory (limit " +
         std::to_string(lim::kMaxClipScratchBytes >> 20) + " MiB): use fewer grid points (n_grid=" +
         std::to_string(n_grid) + "), fewer bit-widths (" + std::to_string(B) +
         ") or per-channel parameters");
  py::array_t<int32_t> best({B, S});
  py::array_t<float> scale({B, S});
  py::array_t<int32_t> zp({B, S});
  py::array_t<double> err({B, S});
  {
    py::gil_scoped_release release;
    const std::vector<int32_t> bits32(bits.begin(), bits.end());
    mixquant::clip_search(w.data(), C, K, lo.data(), hi.data(), S, bits32.data(), B, symmetric,
                          n_grid, step, p, nt, best.mutable_data(), scale.mutable_data(),
                          zp.mutable_data(), err.mutable_data());
  }
  return py::make_tuple(best, scale, zp, err);
}

py::array_t<float> fake_quantize(py::object w_obj, py::object scale_obj, py::object zp_obj,
                                 int64_t bits, int64_t num_threads) {
  int64_t C, K;
  F32 w = weight_arg(w_obj, true, &C, &K);
  const int b = check_bits(bits);
  Params1D prm = params_1d(scale_obj, zp_obj, b, C);
  const int nt = check_threads(num_threads);
  py::array_t<float> out({C, K});
  {
    py::gil_scoped_release release;
    mixquant::fake_quantize(w.data(), C, K, prm.scale.data(), prm.zp.data(), prm.S, b, nt,
                            out.mutable_data());
  }
  return out;
}

py::array quantize(py::object w_obj, py::object scale_obj, py::object zp_obj, int64_t bits,
                   int64_t num_threads) {
  int64_t C, K;
  F32 w = weight_arg(w_obj, true, &C, &K);
  const int b = check_bits(bits);
  Params1D prm = params_1d(scale_obj, zp_obj, b, C);
  const int nt = check_threads(num_threads);
  if (b <= 8) {
    py::array_t<uint8_t> out({C, K});
    {
      py::gil_scoped_release release;
      mixquant::quantize(w.data(), C, K, prm.scale.data(), prm.zp.data(), prm.S, b, nt,
                         out.mutable_data());
    }
    return std::move(out);
  }
  py::array_t<uint16_t> out({C, K});
  {
    py::gil_scoped_release release;
    mixquant::quantize(w.data(), C, K, prm.scale.data(), prm.zp.data(), prm.S, b, nt,
                       out.mutable_data());
  }
  return std::move(out);
}

template <class T>
py::array_t<float> dequantize_t(py::handle codes_obj, py::handle scale_obj, py::handle zp_obj,
                                int b, int nt) {
  auto codes = py::array_t<T, py::array::c_style>::ensure(codes_obj);
  if (!codes) fail("codes must be a uint8 or uint16 array");
  check_ndim(codes, 2, "codes");
  const int64_t C = codes.shape(0), K = codes.shape(1);
  Params1D prm = params_1d(scale_obj, zp_obj, b, C);
  py::array_t<float> out({C, K});
  uint32_t mx = 0;
  {
    py::gil_scoped_release release;
    mx = mixquant::max_code(codes.data(), C * K);
  }
  if (mx > (uint32_t{1} << b) - 1)
    fail("codes must be <= 2**bits - 1 = " + std::to_string((1 << b) - 1) + ", found " +
         std::to_string(mx));
  {
    py::gil_scoped_release release;
    mixquant::dequantize(codes.data(), C, K, prm.scale.data(), prm.zp.data(), prm.S, b, nt,
                         out.mutable_data());
  }
  return out;
}

py::array_t<float> dequantize(py::object codes_obj, py::object scale_obj, py::object zp_obj,
                              int64_t bits, int64_t num_threads) {
  const int b = check_bits(bits);
  const int nt = check_threads(num_threads);
  if (!py::isinstance<py::array>(codes_obj)) fail("codes must be a uint8 or uint16 numpy array");
  const auto dt = py::reinterpret_borrow<py::array>(codes_obj).dtype();
  if (dt.equal(py::dtype::of<uint8_t>()))
    return dequantize_t<uint8_t>(codes_obj, scale_obj, zp_obj, b, nt);
  if (dt.equal(py::dtype::of<uint16_t>()))
    return dequantize_t<uint16_t>(codes_obj, scale_obj, zp_obj, b, nt);
  fail("codes must be a uint8 or uint16 array, got dtype " + std::string(py::str(dt)));
}

template <class T>
py::array_t<uint8_t> pack_t(py::handle codes_obj, int b) {
  auto codes = py::array_t<T, py::array::c_style>::ensure(codes_obj);
  if (!codes) fail("codes must be a uint8 or uint16 array");
  check_ndim(codes, 1, "codes");
  const int64_t n = codes.size();
  py::array_t<uint8_t> out(mixquant::packed_bytes(n, b));
  bool ok;
  {
    py::gil_scoped_release release;
    ok = mixquant::pack_bits(codes.data(), n, b, out.mutable_data());
  }
  if (!ok) fail("codes must be < 2**bits = " + std::to_string(1 << b));
  return out;
}

py::array_t<uint8_t> pack_bits(py::object codes_obj, int64_t bits) {
  const int b = check_bits(bits);
  if (!py::isinstance<py::array>(codes_obj)) fail("codes must be a uint8 or uint16 numpy array");
  const auto dt = py::reinterpret_borrow<py::array>(codes_obj).dtype();
  if (dt.equal(py::dtype::of<uint8_t>())) return pack_t<uint8_t>(codes_obj, b);
  if (dt.equal(py::dtype::of<uint16_t>())) return pack_t<uint16_t>(codes_obj, b);
  fail("codes must be a uint8 or uint16 array, got dtype " + std::string(py::str(dt)));
}

// A 1-D uint8 bit stream holding at least n codes of b bits.
U8 packed_arg(py::object packed_obj, int64_t n, int b) {
  if (!py::isinstance<py::array>(packed_obj) ||
      !py::reinterpret_borrow<py::array>(packed_obj).dtype().equal(py::dtype::of<uint8_t>()))
    fail("packed must be a uint8 numpy array");
  auto packed = U8::ensure(packed_obj);
  if (!packed) fail("packed must be a uint8 numpy array");
  check_ndim(packed, 1, "packed");
  const int64_t need = mixquant::packed_bytes(n, b);
  if (packed.size() < need)
    fail("packed is too short: " + std::to_string(n) + " codes of " + std::to_string(b) +
         " bits need " + std::to_string(need) + " bytes, got " + std::to_string(packed.size()));
  return packed;
}

py::array unpack_bits(py::object packed_obj, int64_t bits, int64_t n) {
  const int b = check_bits(bits);
  if (n < 0) fail("n must be >= 0, got " + std::to_string(n));
  // n * bits must not overflow the 64-bit bit count of packed_bytes().
  if (n > (int64_t{1} << 58)) fail("n is too large, got " + std::to_string(n));
  U8 packed = packed_arg(packed_obj, n, b);
  if (b <= 8) {
    py::array_t<uint8_t> out(n);
    {
      py::gil_scoped_release release;
      mixquant::unpack_bits(packed.data(), n, b, out.mutable_data());
    }
    return std::move(out);
  }
  py::array_t<uint16_t> out(n);
  {
    py::gil_scoped_release release;
    mixquant::unpack_bits(packed.data(), n, b, out.mutable_data());
  }
  return std::move(out);
}

// Fills `out` (float32, C-contiguous, writable, A*C*R elements) in place, so
// that callers can decode into memory they own (a torch tensor's storage).
// The parameter blocks of a packed [rows, cols] layout: checks block (1..cols; 1 for empty rows)
// and returns rows * ceil(cols / block), an empty row still having its one parameter set.
int64_t packed_groups(int64_t rows, int64_t cols, int64_t& block, const char* cols_name) {
  if (cols > 0 && (block < 1 || block > cols))
    fail("block must be in 1.." + std::string(cols_name) + " = " + std::to_string(cols) + ", got " +
         std::to_string(block));
  if (cols == 0) block = 1;
  return rows * (cols == 0 ? 1 : (cols + block - 1) / block);
}

// A writable, C-contiguous float32 numpy array that a kernel writes in place (its size is the caller's check).
py::array float32_out(py::object out_obj) {
  if (!py::isinstance<py::array>(out_obj)) fail("out must be a float32 numpy array");
  py::array out = py::reinterpret_borrow<py::array>(out_obj);
  if (!out.dtype().equal(py::dtype::of<float>())) fail("out must be float32, got " + std::string(py::str(out.dtype())));
  if (!(out.flags() & py::array::c_style)) fail("out must be C-contiguous");
  if (!out.writeable()) fail("out must be writable");
  return out;
}

void unpack_dequantize(py::object packed_obj, int64_t bits, int64_t outer, int64_t channels,
                       int64_t inner, int64_t block, py::handle scale_obj, py::handle zp_obj,
                       int64_t num_threads, py::object out_obj) {
  const int b = check_bits(bits);
  const int nt = check_threads(num_threads);
  if (outer < 0 || channels < 0 || inner < 0)
    fail("outer, channels and inner must be >= 0, got " + std::to_string(outer) + ", " +
         std::to_string(channels) + ", " + std::to_string(inner));
  int64_t n = 0;
  if (__builtin_mul_overflow(outer, channels, &n) || __builtin_mul_overflow(n, inner, &n) ||
      n > (int64_t{1} << 58))
    fail("outer * channels * inner is too large");
  const int64_t groups = packed_groups(channels, inner, block, "inner");
  U8 packed = packed_arg(packed_obj, n, b);
  const int64_t need = mixquant::packed_bytes(n, b);
  F32 scale = as_f32(scale_obj, "scale");
  I64 z = as_i64(zp_obj, "zero_point");
  check_ndim(scale, 1, "scale");
  check_ndim(z, 1, "zero_point");
  if (scale.size() != groups || z.size() != groups)
    fail("scale and zero_point must have channels * max(1, ceil(inner / block)) = " + std::to_string(groups) +
         " entries, got " + std::to_string(scale.size()) + " and " + std::to_string(z.size()));
  check_scales(scale.data(), groups, "scale");
  const std::vector<int32_t> zp = zero_points(z, std::vector<int>(1, b), groups > 0 ? groups : 1, "zero_point");
  py::array out = float32_out(out_obj);
  if (out.size() != n) fail("out must have " + std::to_string(n) + " elements, got " + std::to_string(out.size()));
  float* dst = static_cast<float*>(out.mutable_data());
  const auto* lo = reinterpret_cast<const char*>(dst);
  const auto* src = reinterpret_cast<const char*>(packed.data());
  if (n > 0 && lo < src + need && src < lo + n * static_cast<int64_t>(sizeof(float)))
    fail("out must not overlap packed");
  py::gil_scoped_release release;
  mixquant::unpack_dequantize(packed.data(), b, outer, channels, inner, block, scale.data(), zp.data(), nt, dst);
}

// y (out, float32 [N, rows] in place) = x [N, cols] times the transposed
// [rows, cols] matrix of packed codes, dequantized on the fly.
void packed_matvec(py::object packed_obj, int64_t bits, int64_t rows, int64_t cols, int64_t block,
                   py::handle scale_obj, py::handle zp_obj, py::object x_obj, int64_t num_threads,
                   py::object out_obj) {
  const int b = check_bits(bits);
  const int nt = check_threads(num_threads);
  if (rows < 0 || cols < 0)
    fail("rows and cols must be >= 0, got " + std::to_string(rows) + ", " + std::to_string(cols));
  int64_t n = 0;
  if (__builtin_mul_overflow(rows, cols, &n) || n > (int64_t{1} << 58)) fail("rows * cols is too large");
  const int64_t groups = packed_groups(rows, cols, block, "cols");
  U8 packed = packed_arg(packed_obj, n, b);
  const int64_t need = mixquant::packed_bytes(n, b);
  F32 scale = as_f32(scale_obj, "scale");
  I64 z = as_i64(zp_obj, "zero_point");
  check_ndim(scale, 1, "scale");
  check_ndim(z, 1, "zero_point");
  if (scale.size() != z.size() || (scale.size() != 1 && scale.size() != groups))
    fail("scale and zero_point must have 1 (per tensor) or rows * ceil(cols / block) = " + std::to_string(groups) +
         " entries, got " + std::to_string(scale.size()) + " and " + std::to_string(z.size()));
  const int64_t S = scale.size();
  check_scales(scale.data(), S, "scale");
  const std::vector<int32_t> zp = zero_points(z, std::vector<int>(1, b), S > 0 ? S : 1, "zero_point");
  // x is read in place: exactly float32, C-contiguous, [cols] or [N, cols]; no silent copy.
  if (!py::isinstance<py::array>(x_obj)) fail("x must be a float32 numpy array");
  py::array x = py::reinterpret_borrow<py::array>(x_obj);
  if (!x.dtype().equal(py::dtype::of<float>())) fail("x must be float32, got " + std::string(py::str(x.dtype())));
  if (!(x.flags() & py::array::c_style)) fail("x must be C-contiguous");
  if ((x.ndim() != 1 && x.ndim() != 2) || x.shape(x.ndim() - 1) != cols)
    fail("x must be [cols] or [N, cols] with cols = " + std::to_string(cols) + ", got shape " + shape_str(x));
  const int64_t N = x.ndim() == 1 ? 1 : x.shape(0);
  py::array out = float32_out(out_obj);
  int64_t ny = 0;
  if (__builtin_mul_overflow(N, rows, &ny) || out.size() != ny)
    fail("out must have N * rows = " + std::to_string(N) + " * " + std::to_string(rows) + " elements, got " +
         std::to_string(out.size()));
  float* dst = static_cast<float*>(out.mutable_data());
  const auto overlaps = [&](const void* p, int64_t bytes) {
    const auto* a = reinterpret_cast<const char*>(p);
    const auto* o = reinterpret_cast<const char*>(dst);
    return ny > 0 && bytes > 0 && o < a + bytes && a < o + ny * static_cast<int64_t>(sizeof(float));
  };
  const auto* xp = static_cast<const float*>(x.data());
  if (overlaps(packed.data(), need)) fail("out must not overlap packed");
  if (overlaps(xp, N * cols * static_cast<int64_t>(sizeof(float)))) fail("out must not overlap x");
  py::gil_scoped_release release;
  mixquant::packed_matvec(packed.data(), b, rows, cols, block, scale.data(), zp.data(), S, xp, N, nt, dst);
}

// ------------------------------------------------------------------ groups ----
int64_t check_group_size(int64_t gs) {
  if (gs < 1) fail("group_size must be >= 1, got " + std::to_string(gs));
  return gs;
}

// Group parameters of the element-wise ops: C * G values (1-D, or 2-D [C, G]).
struct GroupParams {
  F32 scale;
  std::vector<int32_t> zp;
};

GroupParams group_params(py::handle scale_obj, py::handle zp_obj, int bits, int64_t C, int64_t G) {
  GroupParams p;
  p.scale = as_f32(scale_obj, "scale");
  I64 z = as_i64(zp_obj, "zero_point");
  const int64_t S = C * G;
  if (p.scale.ndim() > 2 || p.scale.size() != S)
    fail("scale must hold C * G = " + std::to_string(C) + " * " + std::to_string(G) +
         " values (one per group), got shape " + shape_str(p.scale));
  if (z.ndim() > 2 || z.size() != S)
    fail("zero_point must hold C * G = " + std::to_string(S) + " values, got shape " + shape_str(z));
  check_scales(p.scale.data(), S, "scale");
  p.zp = zero_points(z, std::vector<int>(1, bits), S > 0 ? S : 1, "zero_point");
  return p;
}

py::tuple group_minmax(py::object w_obj, int64_t group_size, int64_t num_threads) {
  int64_t C, K;
  F32 w = weight_arg(w_obj, false, &C, &K);
  const int64_t gs = check_group_size(group_size);
  const int nt = check_threads(num_threads);
  const int64_t S = C * mixquant::group_count(K, gs);
  py::array_t<float> lo(S), hi(S);
  int64_t bad = 0;
  {
    py::gil_scoped_release release;
    mixquant::group_minmax(w.data(), C, K, gs, nt, lo.mutable_data(), hi.mutable_data(), &bad);
  }
  return py::make_tuple(lo, hi, bad);
}

py::tuple group_qparams(py::object lo_obj, py::object hi_obj, int64_t bits, bool symmetric) {
  F32 lo = as_f32(lo_obj, "lo"), hi = as_f32(hi_obj, "hi");
  check_ndim(lo, 1, "lo");
  check_ndim(hi, 1, "hi");
  if (lo.size() != hi.size())
    fail("lo and hi must have the same length, got " + std::to_string(lo.size()) + " and " +
         std::to_string(hi.size()));
  const int b = check_bits(bits);
  const int64_t n = lo.size();
  check_finite(lo.data(), n, "lo");
  check_finite(hi.data(), n, "hi");
  py::array_t<float> scale(n);
  py::array_t<int32_t> zp(n);
  {
    py::gil_scoped_release release;
    mixquant::group_qparams(lo.data(), hi.data(), n, b, symmetric, scale.mutable_data(), zp.mutable_data());
  }
  return py::make_tuple(scale, zp);
}

py::tuple group_minmax_error_table(py::object w_obj, py::object bits_obj, int64_t group_size,
                                   bool symmetric, int64_t num_threads) {
  int64_t C, K;
  F32 w = weight_arg(w_obj, false, &C, &K);
  const std::vector<int> bits = bits_list(bits_obj);
  const int64_t B = static_cast<int64_t>(bits.size());
  const int64_t gs = check_group_size(group_size);
  const int nt = check_threads(num_threads);
  const int64_t S = C * mixquant::group_count(K, gs);
  py::array_t<float> lo(S), hi(S), scale({B, S}), max_abs({B, C});
  py::array_t<int32_t> zp({B, S});
  py::array_t<double> sse({B, C}), energy(C);
  int64_t bad = 0;
  {
    py::gil_scoped_release release;
    const std::vector<int32_t> bits32(bits.begin(), bits.end());
    mixquant::group_minmax_error_table(w.data(), C, K, gs, bits32.data(), B, symmetric, nt,
                                       lo.mutable_data(), hi.mutable_data(), scale.mutable_data(),
                                       zp.mutable_data(), sse.mutable_data(), max_abs.mutable_data(),
                                       energy.mutable_data(), &bad);
  }
  return py::make_tuple(lo, hi, scale, zp, sse, max_abs, energy, bad);
}

py::tuple group_error_table(py::object w_obj, py::object scale_obj, py::object zp_obj, py::object bits_obj,
                            int64_t group_size, int64_t num_threads) {
  int64_t C, K;
  F32 w = weight_arg(w_obj, false, &C, &K);
  const std::vector<int> bits = bits_list(bits_obj);
  const int64_t B = static_cast<int64_t>(bits.size());
  const int64_t gs = check_group_size(group_size);
  const int64_t S = C * mixquant::group_count(K, gs);
  F32 scale = as_f32(scale_obj, "scale");
  I64 z = as_i64(zp_obj, "zero_point");
  check_ndim(scale, 2, "scale");
  check_ndim(z, 2, "zero_point");
  if (scale.shape(0) != B || scale.shape(1) != S)
    fail("scale must have shape (B, C * G) = (" + std::to_string(B) + ", " + std::to_string(S) + "), got " +
         shape_str(scale));
  if (z.shape(0) != B || z.shape(1) != S)
    fail("zero_point must have the same shape as scale " + shape_str(scale) + ", got " + shape_str(z));
  check_scales(scale.data(), B * S, "scale");
  const std::vector<int32_t> zp = zero_points(z, bits, S, "zero_point");
  const int nt = check_threads(num_threads);
  py::array_t<double> sse({B, C});
  py::array_t<float> max_abs({B, C});
  {
    py::gil_scoped_release release;
    const std::vector<int32_t> bits32(bits.begin(), bits.end());
    mixquant::group_error_table(w.data(), C, K, gs, scale.data(), zp.data(), bits32.data(), B, nt,
                                sse.mutable_data(), max_abs.mutable_data());
  }
  return py::make_tuple(sse, max_abs);
}

py::tuple group_clip_search(py::object w_obj, py::object lo_obj, py::object hi_obj, py::object bits_obj,
                            int64_t group_size, bool symmetric, int64_t n_grid, double step, double p,
                            int64_t num_threads) {
  int64_t C, K;
  F32 w = weight_arg(w_obj, false, &C, &K);
  const int64_t gs = check_group_size(group_size);
  const int64_t S = C * mixquant::group_count(K, gs);
  F32 lo = as_f32(lo_obj, "lo"), hi = as_f32(hi_obj, "hi");
  check_ndim(lo, 1, "lo");
  check_ndim(hi, 1, "hi");
  if (lo.size() != S || hi.size() != S)
    fail("lo and hi must have C * G = " + std::to_string(S) + " entries each, got " +
         std::to_string(lo.size()) + " and " + std::to_string(hi.size()));
  check_finite(lo.data(), S, "lo");
  check_finite(hi.data(), S, "hi");
  const std::vector<int> bits = bits_list(bits_obj);
  const int64_t B = static_cast<int64_t>(bits.size());
  check_clip_grid(n_grid, step, p);
  const int nt = check_threads(num_threads);
  const int64_t scratch = mixquant::group_clip_search_scratch_bytes(C, K, gs, B, n_grid, nt);
  if (scratch > lim::kMaxClipScratchBytes)
    fail("group_clip_search would need " + std::to_string(scratch >> 20) + " MiB of working memory (limit " +
         std::to_string(lim::kMaxClipScratchBytes >> 20) + " MiB): use fewer grid points or threads");
  py::array_t<int32_t> best({B, S});
  py::array_t<float> scale({B, S});
  py::array_t<int32_t> zp({B, S});
  py::array_t<double> err({B, S});
  {
    py::gil_scoped_release release;
    const std::vector<int32_t> bits32(bits.begin(), bits.end());
    mixquant::group_clip_search(w.data(), C, K, gs, lo.data(), hi.data(), bits32.data(), B, symmetric, n_grid,
                                step, p, nt, best.mutable_data(), scale.mutable_data(), zp.mutable_data(),
                                err.mutable_data());
  }
  return py::make_tuple(best, scale, zp, err);
}

py::array_t<float> group_fake_quantize(py::object w_obj, py::object scale_obj, py::object zp_obj, int64_t bits,
                                       int64_t group_size, int64_t num_threads) {
  int64_t C, K;
  F32 w = weight_arg(w_obj, false, &C, &K);
  const int b = check_bits(bits);
  const int64_t gs = check_group_size(group_size);
  GroupParams prm = group_params(scale_obj, zp_obj, b, C, mixquant::group_count(K, gs));
  const int nt = check_threads(num_threads);
  py::array_t<float> out({C, K});
  {
    py::gil_scoped_release release;
    mixquant::group_fake_quantize(w.data(), C, K, gs, prm.scale.data(), prm.zp.data(), b, nt, out.mutable_data());
  }
  return out;
}

py::array group_quantize(py::object w_obj, py::object scale_obj, py::object zp_obj, int64_t bits,
                         int64_t group_size, int64_t num_threads) {
  int64_t C, K;
  F32 w = weight_arg(w_obj, false, &C, &K);
  const int b = check_bits(bits);
  const int64_t gs = check_group_size(group_size);
  GroupParams prm = group_params(scale_obj, zp_obj, b, C, mixquant::group_count(K, gs));
  const int nt = check_threads(num_threads);
  if (b <= 8) {
    py::array_t<uint8_t> out({C, K});
    {
      py::gil_scoped_release release;
      mixquant::group_quantize(w.data(), C, K, gs, prm.scale.data(), prm.zp.data(), b, nt, out.mutable_data());
    }
    return std::move(out);
  }
  py::array_t<uint16_t> out({C, K});
  {
    py::gil_scoped_release release;
    mixquant::group_quantize(w.data(), C, K, gs, prm.scale.data(), prm.zp.data(), b, nt, out.mutable_data());
  }
  return std::move(out);
}

template <class T>
py::array_t<float> group_dequantize_t(py::handle codes_obj, py::handle scale_obj, py::handle zp_obj, int b,
                                      int64_t gs, int nt) {
  auto codes = py::array_t<T, py::array::c_style>::ensure(codes_obj);
  if (!codes) fail("codes must be a uint8 or uint16 array");
  check_ndim(codes, 2, "codes");
  const int64_t C = codes.shape(0), K = codes.shape(1);
  if (C == 0 || K == 0) fail("codes must have at least one row and one column, got shape " + shape_str(codes));
  GroupParams prm = group_params(scale_obj, zp_obj, b, C, mixquant::group_count(K, gs));
  py::array_t<float> out({C, K});
  uint32_t mx = 0;
  {
    py::gil_scoped_release release;
    mx = mixquant::max_code(codes.data(), C * K);
  }
  if (mx > (uint32_t{1} << b) - 1)
    fail("codes must be <= 2**bits - 1 = " + std::to_string((1 << b) - 1) + ", found " + std::to_string(mx));
  {
    py::gil_scoped_release release;
    mixquant::group_dequantize(codes.data(), C, K, gs, prm.scale.data(), prm.zp.data(), b, nt, out.mutable_data());
  }
  return out;
}

py::array_t<float> group_dequantize(py::object codes_obj, py::object scale_obj, py::object zp_obj, int64_t bits,
                                    int64_t group_size, int64_t num_threads) {
  const int b = check_bits(bits);
  const int64_t gs = check_group_size(group_size);
  const int nt = check_threads(num_threads);
  if (!py::isinstance<py::array>(codes_obj)) fail("codes must be a uint8 or uint16 numpy array");
  const auto dt = py::reinterpret_borrow<py::array>(codes_obj).dtype();
  if (dt.equal(py::dtype::of<uint8_t>()))
    return group_dequantize_t<uint8_t>(codes_obj, scale_obj, zp_obj, b, gs, nt);
  if (dt.equal(py::dtype::of<uint16_t>()))
    return group_dequantize_t<uint16_t>(codes_obj, scale_obj, zp_obj, b, gs, nt);
  fail("codes must be a uint8 or uint16 array, got dtype " + std::string(py::str(dt)));
}

void widen_16(py::object src_obj, const std::string& kind, py::object out_obj, int64_t num_threads) {
  if (kind != "bfloat16" && kind != "float16") fail("kind must be 'bfloat16' or 'float16', got '" + kind + "'");
  if (!py::isinstance<py::array>(src_obj) ||
      !py::reinterpret_borrow<py::array>(src_obj).dtype().equal(py::dtype::of<uint16_t>()))
    fail("src must be a uint16 numpy array (the bit patterns)");
  auto src = U16::ensure(src_obj);
  if (!src) fail("src must be a uint16 numpy array");
  py::array out = float32_out(out_obj);
  if (out.size() < src.size())
    fail("out holds " + std::to_string(out.size()) + " floats, src " + std::to_string(src.size()) + " values");
  const int nt = check_threads(num_threads);
  float* dst = static_cast<float*>(out.mutable_data());
  py::gil_scoped_release release;
  mixquant::widen_16(src.data(), src.size(), kind == "bfloat16", nt, dst);
}

}  // namespace

void bind_rounding(py::module_& m);  // bindings_rounding.cpp

PYBIND11_MODULE(_core, m) {
  m.doc() = "mixquant native core: fused quantization-error kernels with SIMD dispatch";
  mixquant::init_simd_from_env();

  m.def("simd_level", &simd_level,
        "Name of the SIMD level in use on the calling thread: 'scalar', 'avx2' or 'avx512'.");
  m.def("supported_simd_levels", &supported_simd_levels,
        "SIMD levels this CPU and build can run, in the order scalar, avx2, avx512.");
  m.def("set_simd_level", &set_simd_level, "name"_a,
        "Set the process default SIMD level; ValueError if unknown or unsupported.");
  m.def("default_simd_level", &default_simd_level,
        "The process default SIMD level (what threads without an override use).");
  m.def("set_thread_simd_level", &set_thread_simd_level, "name"_a,
        "Override the SIMD level on the calling thread (None: back to the default); ValueError if "
        "unknown or unsupported.");
  m.def("has_openmp", &mixquant::openmp_enabled, "Whether the core was built with OpenMP.");
  m.def("limits", &limits_dict,
        "The limits the binding checks (bit-widths, activation bit-widths, clipping grid, scratch memory).");
  m.def("clip_grid_ok", &clip_grid_ok, "n_grid"_a, "step"_a,
        "Whether every clipping factor 1 - i*step (0 <= i < n_grid) is positive, as the binding checks it.");
  m.def("channel_minmax", &channel_minmax, "w"_a, "num_threads"_a,
        "Per-row (min, max) over finite values of a 2-D float32 w, and the count of NaN/Inf.");
  m.def("qparams", &qparams, "lo"_a, "hi"_a, "bits"_a, "symmetric"_a,
        "(scale float32, zero_point int32) from ranges (lo, hi); zero is included first.");
  m.def("error_table", &error_table, "w"_a, "scale"_a, "zero_point"_a, "bits"_a, "num_threads"_a,
        "(sse float64[B, C], max_abs float32[B, C]) of fake-quantization errors for B bit-widths.");
  m.def("weighted_error_table", &weighted_error_table, "w"_a, "v"_a, "scale"_a, "zero_point"_a,
        "bits"_a, "num_threads"_a,
        "Weighted squared errors wsse[b, c] = sum_k v[c, k] (w - w_hat)^2 (float64[B, C]) of the "
        "parameters scale/zero_point [B, S]; v is (K,) (one weight per column) or (C, K), finite, >= 0.");
  m.def("row_energy", &row_energy, "w"_a, "lo"_a, "hi"_a, "num_threads"_a,
        "sum(w[c]**2) of every row of a 2-D float32 w (float64[C]); lo/hi bound each row's values.");
  m.def("minmax_error_table", &minmax_error_table, "w"_a, "bits"_a, "per_channel"_a, "symmetric"_a,
        "num_threads"_a,
        "Min/max quantizers of every bit-width and their error table in one call: (lo[C], hi[C], "
        "scale[B, S], zero_point[B, S], sse[B, C], max_abs[B, C], energy[C], n_nonfinite).");
  m.def("clip_search", &clip_search, "w"_a, "lo"_a, "hi"_a, "bits"_a, "symmetric"_a, "n_grid"_a,
        "step"_a, "p"_a, "num_threads"_a,
        "Grid search of range shrink factors 1 - i*step minimising sum |e|^p; returns "
        "(best_index, scale, zero_point, lp_err), each [B, S].");
  m.def("fake_quantize", &fake_quantize, "w"_a, "scale"_a, "zero_point"_a, "bits"_a,
        "num_threads"_a, "torch-exact fake quantization of a 2-D float32 w (float32 [C, K]).");
  m.def("quantize", &quantize, "w"_a, "scale"_a, "zero_point"_a, "bits"_a, "num_threads"_a,
        "Integer codes of w: uint8 when bits <= 8, else uint16 ([C, K]).");
  m.def("dequantize", &dequantize, "codes"_a, "scale"_a, "zero_point"_a, "bits"_a,
        "num_threads"_a, "(codes - zero_point) * scale as float32 [C, K].");
  m.def("pack_bits", &pack_bits, "codes"_a, "bits"_a,
        "Pack 1-D uint8/uint16 codes into an LSB-first bit stream (uint8[ceil(n*bits/8)]).");
  m.def("unpack_bits", &unpack_bits, "packed"_a, "bits"_a, "n"_a,
        "Unpack n codes from an LSB-first bit stream (uint8 if bits <= 8, else uint16).");
  m.def("unpack_dequantize", &unpack_dequantize, "packed"_a, "bits"_a, "outer"_a, "channels"_a,
        "inner"_a, "block"_a, "scale"_a, "zero_point"_a, "num_threads"_a, "out"_a,
        "Decode outer*channels*inner packed codes into out (float32, in place): element (a, c, r) is "
        "(code - zero_point[i]) * scale[i], i = c * ceil(inner / block) + r // block.");
  m.def("packed_matvec", &packed_matvec, "packed"_a, "bits"_a, "rows"_a, "cols"_a, "block"_a, "scale"_a,
        "zero_point"_a, "x"_a, "num_threads"_a, "out"_a,
        "out[r, c] = sum_k (code[c, k] - zero_point[i]) * scale[i] * x[r, k] for the rows x cols codes packed "
        "LSB-first at bits, i = c * ceil(cols / block) + k // block (0 with one parameter set); x float32 "
        "[cols] or [N, cols], out float32 [N * rows], both C-contiguous; the weight is never formed.");

  m.def("widen_16", &widen_16, "src"_a, "kind"_a, "out"_a, "num_threads"_a,
        "Write the float32 values of uint16 bfloat16/float16 bit patterns into out[:src.size] (exact).");
  m.def("group_minmax", &group_minmax, "w"_a, "group_size"_a, "num_threads"_a,
        "Per-group (min, max) over finite values of a 2-D float32 w (groups of group_size consecutive elements "
        "of each row, the last one possibly short): (lo[C*G], hi[C*G], n_nonfinite).");
  m.def("group_qparams", &group_qparams, "lo"_a, "hi"_a, "bits"_a, "symmetric"_a,
        "qparams with the scale rounded up to bfloat16 and the zero point computed from it.");
  m.def("group_minmax_error_table", &group_minmax_error_table, "w"_a, "bits"_a, "group_size"_a, "symmetric"_a,
        "num_threads"_a,
        "Group-wise min/max quantizers of every bit-width and their error table in one pass: (lo[S], hi[S], "
        "scale[B, S], zero_point[B, S], sse[B, C], max_abs[B, C], energy[C], n_nonfinite), S = C * G.");
  m.def("group_error_table", &group_error_table, "w"_a, "scale"_a, "zero_point"_a, "bits"_a, "group_size"_a,
        "num_threads"_a, "(sse float64[B, C], max_abs float32[B, C]) of group-wise parameters [B, C * G].");
  m.def("group_clip_search", &group_clip_search, "w"_a, "lo"_a, "hi"_a, "bits"_a, "group_size"_a, "symmetric"_a,
        "n_grid"_a, "step"_a, "p"_a, "num_threads"_a,
        "clip_search per group with bfloat16 scales: (best_index, scale, zero_point, lp_err), each [B, C * G].");
  m.def("group_fake_quantize", &group_fake_quantize, "w"_a, "scale"_a, "zero_point"_a, "bits"_a, "group_size"_a,
        "num_threads"_a, "Group-wise torch-exact fake quantization (float32 [C, K]); parameters [C * G].");
  m.def("group_quantize", &group_quantize, "w"_a, "scale"_a, "zero_point"_a, "bits"_a, "group_size"_a,
        "num_threads"_a, "Group-wise integer codes: uint8 when bits <= 8, else uint16 ([C, K]).");
  m.def("group_dequantize", &group_dequantize, "codes"_a, "scale"_a, "zero_point"_a, "bits"_a, "group_size"_a,
        "num_threads"_a, "Group-wise (codes - zero_point) * scale as float32 [C, K].");
  bind_rounding(m);
}
