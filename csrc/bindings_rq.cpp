// Bindings of the residual quantization kernels (csrc/rq_cpu.h).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "bindings_util.h"
#include "rq_cpu.h"

#include <string>

namespace sigma_fast::bind {
namespace {

void rq_encode(const py::array& x, const py::array& codebooks, int64_t beam_width,
               py::array codes, const py::object& err, const std::string& strategy) {
  RqStrategy strat = RqStrategy::kAuto;
  if (strategy == "direct") strat = RqStrategy::kDirect;
  else if (strategy == "cross") strat = RqStrategy::kCross;
  else require(strategy == "auto", "strategy must be 'auto', 'direct' or 'cross'; got '" +
                                       strategy + "'");
  check_array<float>(x, "x", 2);
  check_array<float>(codebooks, "codebooks", 3);
  check_array<int64_t>(codes, "codes", 2, true);
  require_contiguous(codebooks, "codebooks");
  require_contiguous(codes, "codes");
  const int64_t n = x.shape(0), d = x.shape(1);
  const int64_t levels = codebooks.shape(0), k = codebooks.shape(1);
  require(codebooks.shape(2) == d, "codebooks: expected last dimension " + std::to_string(d) +
                                       " (x's), got " + std::to_string(codebooks.shape(2)));
  require(codes.shape(0) == n && codes.shape(1) == levels,
          "codes: expected shape [" + std::to_string(n) + ", " + std::to_string(levels) +
              "], got " + shape_str(codes));
  const int64_t ldx = row_stride(x, "x");
  float* err_ptr = nullptr;
  if (!err.is_none()) {
    py::array e = err.cast<py::array>();
    check_array<float>(e, "err", 1, true);
    require_contiguous(e, "err");
    require(e.shape(0) == n, "err: expected length " + std::to_string(n));
    err_ptr = static_cast<float*>(e.mutable_data());
  }
  const auto* xp = static_cast<const float*>(x.data());
  const auto* cp = static_cast<const float*>(codebooks.data());
  auto* out = static_cast<int64_t*>(codes.mutable_data());
  guard_alloc("rq_encode",
              [&] {
                return "n=" + std::to_string(n) + ", d=" + std::to_string(d) +
                       ", levels=" + std::to_string(levels) + ", k=" + std::to_string(k) +
                       ", beam_width=" + std::to_string(beam_width);
              },
              [&] {
                py::gil_scoped_release release;
                sigma_fast::rq_encode_cpu(xp, n, d, ldx, cp, levels, k, beam_width, out, err_ptr,
                                          strat);
              });
}

template <class CodeT>
void rq_decode_t(const py::array& codes, const py::array& codebooks, int64_t levels,
                 py::array out) {
  const int64_t n = codes.shape(0), d = codebooks.shape(2), k = codebooks.shape(1);
  const int64_t ldc = row_stride(codes, "codes");
  const auto* cp = static_cast<const CodeT*>(codes.data());
  const auto* cb = static_cast<const float*>(codebooks.data());
  const int64_t ldo = row_stride(out, "out");
  auto* op = static_cast<float*>(out.mutable_data());
  guard_alloc("rq_decode",
              [&] { return "n=" + std::to_string(n) + ", levels=" + std::to_string(levels); },
              [&] {
                py::gil_scoped_release release;
                sigma_fast::rq_decode_cpu<CodeT>(cp, n, ldc, levels, cb, k, d, op, ldo);
              });
}

void rq_decode(const py::array& codes, const py::array& codebooks, int64_t levels,
               py::array out) {
  check_array<float>(codebooks, "codebooks", 3);
  require_contiguous(codebooks, "codebooks");
  check_array<float>(out, "out", 2, true);  // rows may be strided (row_stride checks)
  require(codes.ndim() == 2, "codes: expected a 2-d array, got shape " + shape_str(codes));
  require(levels >= 0 && levels <= codes.shape(1) && levels <= codebooks.shape(0),
          "levels: expected 0 <= levels <= min(codes.shape[1], codebooks.shape[0]); got " +
              std::to_string(levels));
  require(out.shape(0) == codes.shape(0) && out.shape(1) == codebooks.shape(2),
          "out: expected shape [" + std::to_string(codes.shape(0)) + ", " +
              std::to_string(codebooks.shape(2)) + "], got " + shape_str(out));
  if (codes.dtype().is(py::dtype::of<int64_t>())) {
    rq_decode_t<int64_t>(codes, codebooks, levels, out);
  } else if (codes.dtype().is(py::dtype::of<int32_t>())) {
    rq_decode_t<int32_t>(codes, codebooks, levels, out);
  } else {
    throw std::invalid_argument("codes: expected dtype int32 or int64, got " +
                                std::string(py::str(codes.dtype())));
  }
}


}  // namespace

void bind_rq(py::module_& m) {
  m.def("rq_encode", &rq_encode, py::arg("x"), py::arg("codebooks"), py::arg("beam_width"),
        py::arg("codes"), py::arg("err") = py::none(), py::arg("strategy") = "auto");
  m.def("rq_decode", &rq_decode, py::arg("codes"), py::arg("codebooks"), py::arg("levels"),
        py::arg("out"));
}

}  // namespace sigma_fast::bind
