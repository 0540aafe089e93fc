// pybind11 bindings of the C++ core (module sigma_fast._core). The Python layer validates
// user input; these wrappers re-check what memory safety depends on (dtypes, shapes,
// strides), release the GIL, and write into caller-allocated outputs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "common.h"
#include "dot_kernels.h"
#include "rq_cpu.h"

namespace py = pybind11;
using sigma_fast::require;

namespace {

std::string shape_str(const py::array& a) {
  std::string s = "[";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + "]";
}

template <class T>
void check_array(const py::array& a, const char* name, int ndim, bool writable = false) {
  require(py::isinstance<py::array_t<T>>(a) && a.dtype().is(py::dtype::of<T>()),
          std::string(name) + ": expected dtype " + std::string(py::str(py::dtype::of<T>())) +
              ", got " + std::string(py::str(a.dtype())));
  require(a.ndim() == ndim, std::string(name) + ": expected " + std::to_string(ndim) +
                                "-d array, got shape " + shape_str(a));
  if (writable) require(a.writeable(), std::string(name) + ": output array is read-only");
}

// Rows may be strided but each row must be contiguous.
int64_t row_stride(const py::array& a, const char* name) {
  const auto item = static_cast<py::ssize_t>(a.itemsize());
  if (a.ndim() >= 2 && a.shape(0) == 0) return static_cast<int64_t>(a.shape(1));
  require(a.ndim() < 2 || a.shape(1) <= 1 || a.strides(1) == item,
          std::string(name) + ": rows must be contiguous (last-dimension stride 1)");
  if (a.shape(0) <= 1) return a.ndim() >= 2 ? static_cast<int64_t>(a.shape(1)) : 1;
  require(a.strides(0) % item == 0 && a.strides(0) >= 0,
          std::string(name) + ": unsupported row stride");
  return static_cast<int64_t>(a.strides(0) / item);
}

void require_contiguous(const py::array& a, const char* name) {
  require(a.flags() & py::array::c_style, std::string(name) + ": expected a C-contiguous array");
}

void rq_encode(const py::array& x, const py::array& codebooks, int64_t beam_width,
               py::array codes, const py::object& err) {
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
  py::gil_scoped_release release;
  sigma_fast::rq_encode_cpu(xp, n, d, ldx, cp, levels, k, beam_width, out, err_ptr);
}

template <class CodeT>
void rq_decode_t(const py::array& codes, const py::array& codebooks, int64_t levels,
                 py::array out) {
  const int64_t n = codes.shape(0), d = codebooks.shape(2), k = codebooks.shape(1);
  const int64_t ldc = row_stride(codes, "codes");
  const auto* cp = static_cast<const CodeT*>(codes.data());
  const auto* cb = static_cast<const float*>(codebooks.data());
  auto* op = static_cast<float*>(out.mutable_data());
  py::gil_scoped_release release;
  sigma_fast::rq_decode_cpu<CodeT>(cp, n, ldc, levels, cb, k, d, op);
}

void rq_decode(const py::array& codes, const py::array& codebooks, int64_t levels,
               py::array out) {
  check_array<float>(codebooks, "codebooks", 3);
  require_contiguous(codebooks, "codebooks");
  check_array<float>(out, "out", 2, true);
  require_contiguous(out, "out");
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

PYBIND11_MODULE(_core, m) {
  m.doc() = "sigma_fast C++ core (torch-free)";
  m.def("rq_encode", &rq_encode, py::arg("x"), py::arg("codebooks"), py::arg("beam_width"),
        py::arg("codes"), py::arg("err") = py::none());
  m.def("rq_decode", &rq_decode, py::arg("codes"), py::arg("codebooks"), py::arg("levels"),
        py::arg("out"));
  m.def("get_num_threads", &sigma_fast::get_num_threads);
  m.def("set_num_threads", &sigma_fast::set_num_threads, py::arg("n"));
  m.def("dot_kernel_name", &sigma_fast::dot_kernel_name);
#ifdef SIGMA_FAST_SANITIZED
  m.attr("sanitized") = true;
#else
  m.attr("sanitized") = false;
#endif
}
