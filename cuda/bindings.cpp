// The pybind11 module sigma_fast._cuda: one bind_<op>() per op with a CUDA twin, each in its
// own bindings_<op>.cpp. Torch-free: device pointers and the stream arrive as Python ints (see
// bindings_cuda.h).
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

namespace py = pybind11;

namespace sigma_fast::bind {
void bind_rq(py::module_& m);
void bind_apf(py::module_& m);
void bind_beam_step(py::module_& m);
}  // namespace sigma_fast::bind

namespace {

// Number of visible CUDA devices; 0 (never an exception) without a driver or device.
int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear it so a later launch check does not report it
    return 0;
  }
  return count;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "sigma_fast CUDA backend (torch-free; pointers and streams are passed as ints)";
  sigma_fast::bind::bind_rq(m);
  sigma_fast::bind::bind_apf(m);
  sigma_fast::bind::bind_beam_step(m);
  m.def("device_count", &device_count, "Visible CUDA devices (0 when none or no driver).");
}
