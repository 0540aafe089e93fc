// Array checks shared by the pybind11 binding files: what memory safety depends on (dtypes,
// shapes, strides, writability), re-checked at the boundary even though Python validated.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <new>
#include <stdexcept>
#include <string>

#include "common.h"

namespace sigma_fast::bind {

namespace py = pybind11;
using sigma_fast::require;

// A Python MemoryError with a message (pybind11 maps a bare std::bad_alloc to MemoryError
// without saying which op or sizes failed).
class memory_error : public py::builtin_exception {
 public:
  using py::builtin_exception::builtin_exception;
  void set_error() const override { PyErr_SetString(PyExc_MemoryError, what()); }
};

// Runs f(), a kernel call. Python validates sizes before they get here, so an allocation
// failure inside a kernel (std::bad_alloc, or std::length_error from a container asked for an
// impossible size) is a machine limit: it becomes a MemoryError naming the op and the sizes
// (built by describe() only then) instead of a bare "std::bad_alloc". Every other exception
// passes through to pybind11's usual translation (invalid_argument -> ValueError, out_of_range
// -> IndexError); nothing escapes as an abort.
template <class F, class Describe>
decltype(auto) guard_alloc(const char* op, Describe&& describe, F&& f) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    throw memory_error(std::string(op) + ": out of memory (" + describe() + ")");
  } catch (const std::length_error& e) {
    throw memory_error(std::string(op) + ": a buffer would exceed the largest size this "
                       "machine can allocate (" + describe() + "; " + e.what() + ")");
  }
}

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

inline void require_shape(const py::array& a, const char* name,
                          std::initializer_list<int64_t> shape) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  std::string want = "[";
  int i = 0;
  for (int64_t s : shape) {
    want += (i ? ", " : "") + std::to_string(s);
    ok = ok && a.shape(i) == s;
    ++i;
  }
  require(ok, std::string(name) + ": expected shape " + want + "], got " + shape_str(a));
}

// Element stride of dimension `dim` (bytes -> elements), required non-negative.
inline int64_t elem_stride(const py::array& a, int dim, const char* name) {
  const auto item = static_cast<py::ssize_t>(a.itemsize());
  if (a.strides(dim) < 0 || a.strides(dim) % item != 0)
    throw std::invalid_argument(std::string(name) + ": unsupported stride in dimension " +
                                std::to_string(dim));
  return static_cast<int64_t>(a.strides(dim) / item);
}

// Argument checks that build their message only on failure, for the ops that run once per
// generated token (the trie walk and the beam step): a few microseconds of string formatting
// per argument would dominate small steps.
template <class T>
void check_arg(const py::array& a, const char* name, int ndim, bool writable = false) {
  if (!a.dtype().is(py::dtype::of<T>()) || a.ndim() != ndim || (writable && !a.writeable()))
    check_array<T>(a, name, ndim, writable);  // throws with the full message
}

// A C-contiguous int64 vector, of the given length unless length < 0.
inline void check_vector(const py::array& a, const char* name, int64_t length = -1) {
  check_arg<int64_t>(a, name, 1);
  if (!(a.flags() & py::array::c_style)) require_contiguous(a, name);
  if (length >= 0 && a.shape(0) != length)
    throw std::invalid_argument(std::string(name) + ": expected length " +
                                std::to_string(length) + ", got " + shape_str(a));
}

inline const int64_t* i64(const py::array& a) { return static_cast<const int64_t*>(a.data()); }

// Checks the trie's CSR child lists (csrc/trie.h) that the walk and the beam step index
// into; returns the number of nodes.
inline int64_t check_children(const py::array& child_offsets, const py::array& child_tokens,
                              const py::array& child_nodes) {
  check_vector(child_offsets, "child_offsets");
  require(child_offsets.shape(0) >= 2, "child_offsets: expected at least 2 entries (a root)");
  const int64_t nodes = child_offsets.shape(0) - 1;
  const int64_t slots = i64(child_offsets)[nodes];
  require(slots >= 0, "child_offsets: the last entry must be >= 0");
  check_vector(child_tokens, "child_tokens", slots);
  check_vector(child_nodes, "child_nodes", slots);
  return nodes;
}

}  // namespace sigma_fast::bind
