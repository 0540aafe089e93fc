// Array checks shared by the pybind11 binding files: what memory safety depends on (dtypes,
// shapes, strides, writability), re-checked at the boundary even though Python validated.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common.h"

namespace sigma_fast::bind {

namespace py = pybind11;
using sigma_fast::require;


inline std::string shape_str(const py::array& a) {
  std::string s = "[";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + "]";
}

template <class T>
void check_array(const py::array& a, const char* name, int ndim, bool writable = false) {
  // Messages are built only on failure: these checks run on every call of every op.
  if (!a.dtype().is(py::dtype::of<T>()))
    throw std::invalid_argument(std::string(name) + ": expected dtype " +
                                std::string(py::str(py::dtype::of<T>())) + ", got " +
                                std::string(py::str(a.dtype())));
  if (a.ndim() != ndim)
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(ndim) +
                                "-d array, got shape " + shape_str(a));
  if (writable && !a.writeable())
    throw std::invalid_argument(std::string(name) + ": output array is read-only");
}

// Rows may be strided but each row must be contiguous.
inline int64_t row_stride(const py::array& a, const char* name) {
  const auto item = static_cast<py::ssize_t>(a.itemsize());
  if (a.ndim() >= 2 && a.shape(0) == 0) return static_cast<int64_t>(a.shape(1));
  if (!(a.ndim() < 2 || a.shape(1) <= 1 || a.strides(1) == item))
    throw std::invalid_argument(std::string(name) +
                                ": rows must be contiguous (last-dimension stride 1)");
  if (a.shape(0) <= 1) return a.ndim() >= 2 ? static_cast<int64_t>(a.shape(1)) : 1;
  if (a.strides(0) % item != 0 || a.strides(0) < 0)
    throw std::invalid_argument(std::string(name) + ": unsupported row stride");
  return static_cast<int64_t>(a.strides(0) / item);
}

inline void require_contiguous(const py::array& a, const char* name) {
  if (!(a.flags() & py::array::c_style))
    throw std::invalid_argument(std::string(name) + ": expected a C-contiguous array");
}

}  // namespace sigma_fast::bind
