// What the binding files of sigma_fast._cuda share: device pointers and the stream arrive as
// Python ints (tensor.data_ptr(), stream.cuda_stream) from the Python layer, which validates
// user input and allocates every buffer; the bindings only convert them, release the GIL and
// call the op's entry point (which throws std::invalid_argument for bad sizes and
// std::runtime_error for CUDA errors).
#pragma once

#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include <cstdint>

namespace sigma_fast::bind {

namespace py = pybind11;

template <class T>
T* as_ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace sigma_fast::bind
