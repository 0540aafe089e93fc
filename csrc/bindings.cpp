// The pybind11 module sigma_fast._core: one bind_<op>() per op, each in its own
// bindings_<op>.cpp. Python validates user input; the bindings re-check what memory safety
// depends on, release the GIL, and write into caller-allocated outputs.
#include <pybind11/pybind11.h>

#include "common.h"
#include "dot_kernels.h"

namespace py = pybind11;

namespace sigma_fast::bind {
void bind_rq(py::module_& m);
void bind_trie(py::module_& m);
void bind_beam_step(py::module_& m);
void bind_item_index(py::module_& m);
void bind_apf(py::module_& m);
}  // namespace sigma_fast::bind

PYBIND11_MODULE(_core, m) {
  m.doc() = "sigma_fast C++ core (torch-free)";
  sigma_fast::bind::bind_rq(m);
  sigma_fast::bind::bind_trie(m);
  sigma_fast::bind::bind_beam_step(m);
  sigma_fast::bind::bind_item_index(m);
  sigma_fast::bind::bind_apf(m);
  m.def("get_num_threads", &sigma_fast::get_num_threads);
  m.def("set_num_threads", &sigma_fast::set_num_threads, py::arg("n"));
  m.def("dot_kernel_name", &sigma_fast::dot_kernel_name);
#ifdef SIGMA_FAST_SANITIZED
  m.attr("sanitized") = true;
#else
  m.attr("sanitized") = false;
#endif
}
