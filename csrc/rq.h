// Residual quantization (rq_encode / rq_decode): the layout and the argument checks shared by
// the CPU twin (rq_cpu.h) and the CUDA twin (cuda/rq_cuda.h). Torch-free and CUDA-free: it
// compiles with a plain C++17 compiler and with nvcc. Semantics:
// python/sigma_fast/reference/rq.py.
//
// Layout on every backend: x float32 [n, d], rows contiguous, row stride ldx >= d; codebooks
// float32 [levels, k, d], contiguous; codes int64 [n, levels], contiguous (rq_decode also reads
// int32 codes, row stride ldc); err float32 [n], nullable.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace sigma_fast {

// The sizes every rq_encode backend accepts (each adds the limits of its own kernels).
// Throws std::invalid_argument.
inline void check_rq_encode_sizes(int64_t n, int64_t d, int64_t levels, int64_t k,
                                  int64_t beam_width) {
  if (!(n >= 0 && d >= 1 && levels >= 1 && k >= 1))
    throw std::invalid_argument(
        "rq_encode: expected n >= 0, d >= 1, levels >= 1, k >= 1; got n=" + std::to_string(n) +
        " d=" + std::to_string(d) + " levels=" + std::to_string(levels) +
        " k=" + std::to_string(k));
  if (beam_width < 1)
    throw std::invalid_argument("rq_encode: beam_width must be >= 1; got " +
                                std::to_string(beam_width));
}

inline void check_rq_encode_stride(int64_t ldx, int64_t d) {
  if (ldx < d)
    throw std::invalid_argument("rq_encode: row stride of x must be >= d; got ldx=" +
                                std::to_string(ldx) + " d=" + std::to_string(d));
}

// The sizes every rq_decode backend accepts. Throws std::invalid_argument.
inline void check_rq_decode_sizes(int64_t n, int64_t d, int64_t levels, int64_t k, int64_t ldc) {
  if (!(n >= 0 && d >= 1 && levels >= 0 && k >= 1 && ldc >= 0))
    throw std::invalid_argument(
        "rq_decode: expected n >= 0, d >= 1, levels >= 0, k >= 1, ldc >= 0; got n=" +
        std::to_string(n) + " d=" + std::to_string(d) + " levels=" + std::to_string(levels) +
        " k=" + std::to_string(k) + " ldc=" + std::to_string(ldc));
}

}  // namespace sigma_fast
