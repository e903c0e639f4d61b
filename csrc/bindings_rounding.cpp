// Binding of the fused AdaRound step (rounding.h): checks, then the GIL is released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "rounding.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

using Arr = py::array_t<float, py::array::c_style>;

[[noreturn]] void fail(const std::string& msg) { throw py::value_error(msg); }

// A 1-D C-contiguous float32 numpy array of n elements (n < 0: any size), used
// in place: never converted (a converted copy would silently drop the writes).
Arr flat(py::handle obj, const char* name, int64_t n, bool writable) {
  if (!py::isinstance<py::array>(obj)) fail(std::string(name) + " must be a numpy array");
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().equal(py::dtype::of<float>())) fail(std::string(name) + " must be float32");
  if (a.ndim() != 1) fail(std::string(name) + " must be 1-D");
  if (!(a.flags() & py::array::c_style)) fail(std::string(name) + " must be contiguous");
  if (writable && !a.writeable()) fail(std::string(name) + " must be writable");
  if (n >= 0 && a.shape(0) != n)
    fail(std::string(name) + " must have " + std::to_string(n) + " elements, got " + std::to_string(a.shape(0)));
  return py::reinterpret_borrow<Arr>(a);
}

// Outputs must not overlap each other or any input (the kernel reads and writes element by element).
void check_no_overlap(const std::vector<std::pair<const char*, const Arr*>>& outs,
                      const std::vector<std::pair<const char*, const Arr*>>& all) {
  for (const auto& o : outs) {
    const auto* a0 = reinterpret_cast<const char*>(o.second->data());
    const auto* a1 = a0 + o.second->nbytes();
    for (const auto& x : all) {
      if (x.second == o.second) continue;
      const auto* b0 = reinterpret_cast<const char*>(x.second->data());
      const auto* b1 = b0 + x.second->nbytes();
      if (a0 < b1 && b0 < a1) fail(std::string(o.first) + " overlaps " + x.first);
    }
  }
}

int threads(int64_t nt) {
  if (nt < 1) fail("num_threads must be >= 1, got " + std::to_string(nt));
  return nt > 1024 ? 1024 : static_cast<int>(nt);
}

void check_bounds(const Arr& lo, const Arr& hi, const Arr& scale) {
  const float* l = lo.data();
  const float* h = hi.data();
  const float* s = scale.data();
  for (int64_t i = 0; i < lo.shape(0); ++i) {
    if (!(std::isfinite(l[i]) && std::isfinite(h[i]) && l[i] <= h[i]))
      fail("lo and hi must be finite with lo <= hi, got " + std::to_string(l[i]) + ", " + std::to_string(h[i]) +
           " at index " + std::to_string(i));
    if (!(std::isfinite(s[i]) && s[i] > 0.0f))
      fail("scale must be finite and > 0, got " + std::to_string(s[i]) + " at index " + std::to_string(i));
  }
}

void rounding_weight(py::object V_, py::object fl_, py::object sc_, py::object lo_, py::object hi_, py::object w_,
                     int64_t num_threads) {
  Arr V = flat(V_, "V", -1, false);
  const int64_t n = V.shape(0);
  Arr fl = flat(fl_, "floor", n, false), sc = flat(sc_, "scale", n, false), lo = flat(lo_, "lo", n, false),
      hi = flat(hi_, "hi", n, false), w = flat(w_, "w", n, true);
  check_no_overlap({{"w", &w}}, {{"V", &V}, {"floor", &fl}, {"scale", &sc}, {"lo", &lo}, {"hi", &hi}, {"w", &w}});
  check_bounds(lo, hi, sc);
  const int nt = threads(num_threads);
  py::gil_scoped_release release;
  mixquant::rounding_weight(V.data(), fl.data(), sc.data(), lo.data(), hi.data(), n, nt, w.mutable_data());
}

void rounding_step(py::object V_, py::object fl_, py::object sc_, py::object lo_, py::object hi_, py::object gw_,
                   py::object m_, py::object v_, py::object w_, float coef, float beta, float beta_minus_1,
                   float lerp_w, float beta2, float one_minus_beta2, float neg_step, float bc2_sqrt, float eps,
                   int64_t num_threads) {
  Arr V = flat(V_, "V", -1, true);
  const int64_t n = V.shape(0);
  Arr fl = flat(fl_, "floor", n, false), sc = flat(sc_, "scale", n, false), lo = flat(lo_, "lo", n, false),
      hi = flat(hi_, "hi", n, false), gw = flat(gw_, "grad_w", n, false), m = flat(m_, "exp_avg", n, true),
      v = flat(v_, "exp_avg_sq", n, true), w = flat(w_, "w", n, true);
  check_no_overlap({{"V", &V}, {"exp_avg", &m}, {"exp_avg_sq", &v}, {"w", &w}},
                   {{"V", &V}, {"floor", &fl}, {"scale", &sc}, {"lo", &lo}, {"hi", &hi}, {"grad_w", &gw},
                    {"exp_avg", &m}, {"exp_avg_sq", &v}, {"w", &w}});
  check_bounds(lo, hi, sc);
  for (float x : {coef, beta, beta_minus_1, lerp_w, beta2, one_minus_beta2, neg_step, bc2_sqrt, eps})
    if (!std::isfinite(x)) fail("every step constant must be finite");
  if (!(coef >= 0.0f)) fail("coef must be >= 0");
  if (!(beta > 0.0f)) fail("beta must be > 0");
  if (!(bc2_sqrt > 0.0f) || !(eps > 0.0f)) fail("bc2_sqrt and eps must be > 0");
  const mixquant::RoundingStep p{coef, beta, beta_minus_1, lerp_w, beta2, one_minus_beta2, neg_step, bc2_sqrt, eps};
  const int nt = threads(num_threads);
  py::gil_scoped_release release;
  mixquant::rounding_step(V.mutable_data(), fl.data(), sc.data(), lo.data(), hi.data(), gw.data(),
                          m.mutable_data(), v.mutable_data(), p, n, nt, w.mutable_data());
}

}  // namespace

void bind_rounding(py::module_& m) {
  m.def("rounding_weight", &rounding_weight, "V"_a, "floor"_a, "scale"_a, "lo"_a, "hi"_a, "w"_a, "num_threads"_a,
        "AdaRound's soft weight scale * clamp(floor + h(V), lo, hi) into w (all 1-D float32 of one length).");
  m.def("rounding_step", &rounding_step, "V"_a, "floor"_a, "scale"_a, "lo"_a, "hi"_a, "grad_w"_a, "exp_avg"_a,
        "exp_avg_sq"_a, "w"_a, "coef"_a, "beta"_a, "beta_minus_1"_a, "lerp_w"_a, "beta2"_a, "one_minus_beta2"_a,
        "neg_step"_a, "bc2_sqrt"_a, "eps"_a, "num_threads"_a,
        "One fused AdaRound step in place: the gradient of L(w) + coef * sum(1 - |2h - 1|^beta) with respect "
        "to V from grad_w = dL/dw, torch.optim.Adam's update of V, exp_avg, exp_avg_sq, and w of the new V.");
}
