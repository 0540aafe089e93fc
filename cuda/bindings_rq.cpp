// CUDA bindings of residual quantization (cuda/rq_cuda.h).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "bindings_cuda.h"
#include "rq_cuda.h"

namespace sigma_fast::bind {
namespace {

int64_t rq_encode_workspace_bytes(int64_t n, int64_t d, int64_t levels, int64_t k,
                                  int64_t beam_width) {
  return sigma_fast::rq_encode_cuda_workspace_bytes(n, d, levels, k, beam_width);
}

void rq_encode(std::uintptr_t x, int64_t n, int64_t d, int64_t ldx, std::uintptr_t codebooks,
               int64_t levels, int64_t k, int64_t beam_width, std::uintptr_t codes,
               std::uintptr_t err, std::uintptr_t workspace, int64_t workspace_bytes,
               std::uintptr_t stream) {
  py::gil_scoped_release release;
  sigma_fast::rq_encode_cuda(as_ptr<const float>(x), n, d, ldx, as_ptr<const float>(codebooks),
                             levels, k, beam_width, as_ptr<int64_t>(codes), as_ptr<float>(err),
                             as_ptr<void>(workspace), workspace_bytes, as_stream(stream));
}

void rq_decode(std::uintptr_t codes, bool codes_is_int64, int64_t n, int64_t ldc, int64_t levels,
               std::uintptr_t codebooks, int64_t k, int64_t d, std::uintptr_t out,
               std::uintptr_t stream) {
  py::gil_scoped_release release;
  if (codes_is_int64) {
    sigma_fast::rq_decode_cuda<int64_t>(as_ptr<const int64_t>(codes), n, ldc, levels,
                                        as_ptr<const float>(codebooks), k, d, as_ptr<float>(out),
                                        as_stream(stream));
  } else {
    sigma_fast::rq_decode_cuda<int32_t>(as_ptr<const int32_t>(codes), n, ldc, levels,
                                        as_ptr<const float>(codebooks), k, d, as_ptr<float>(out),
                                        as_stream(stream));
  }
}

}  // namespace

void bind_rq(py::module_& m) {
  m.def("rq_encode_workspace_bytes", &rq_encode_workspace_bytes, py::arg("n"), py::arg("d"),
        py::arg("levels"), py::arg("k"), py::arg("beam_width"),
        "Bytes of device scratch rq_encode needs (0 for n == 0).");
  m.def("rq_encode", &rq_encode, py::arg("x_ptr"), py::arg("n"), py::arg("d"), py::arg("ldx"),
        py::arg("codebooks_ptr"), py::arg("levels"), py::arg("k"), py::arg("beam_width"),
        py::arg("codes_ptr"), py::arg("err_ptr"), py::arg("ws_ptr"), py::arg("ws_bytes"),
        py::arg("stream"),
        "Residual-quantize x [n, d] (row stride ldx) with codebooks [levels, k, d] into codes "
        "int64 [n, levels] and err float32 [n] (err_ptr may be 0), asynchronously on stream.");
  m.def("rq_decode", &rq_decode, py::arg("codes_ptr"), py::arg("codes_is_int64"), py::arg("n"),
        py::arg("ldc"), py::arg("levels"), py::arg("codebooks_ptr"), py::arg("k"), py::arg("d"),
        py::arg("out_ptr"), py::arg("stream"),
        "out [n, d] = sum over l < levels of codebooks[l, codes[i * ldc + l]], asynchronously "
        "on stream.");
  m.attr("workspace_budget_bytes") = sigma_fast::kRqWorkspaceBudget;
}

}  // namespace sigma_fast::bind
