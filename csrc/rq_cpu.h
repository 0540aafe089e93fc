// Residual quantization on the CPU (torch-free). The layout and checks shared with the CUDA
// twin are in rq.h; semantics: python/sigma_fast/reference/rq.py.
#pragma once

#include <cstdint>

#include "rq.h"

namespace sigma_fast {

// How beam search evaluates <r, c>: from materialised residuals ("direct": (1 + (L-1)B) dot
// products of length d per vector) or from <x, c> and codebook cross tables ("cross": L dot
// products per vector plus table rows; used when the tables fit 64 MiB). kAuto picks; the
// others exist for tests. Greedy encoding is always direct.
enum class RqStrategy { kAuto, kDirect, kCross };

// Encodes n rows of x (width d, row stride ldx) with `levels` codebooks of k codewords each
// (codebooks is levels x k x d, contiguous). Greedy for beam_width == 1, beam search otherwise.
// codes: n x levels, contiguous. err (nullable): squared norm of each row's final residual.
void rq_encode_cpu(const float* x, int64_t n, int64_t d, int64_t ldx, const float* codebooks,
                   int64_t levels, int64_t k, int64_t beam_width, int64_t* codes, float* err,
                   RqStrategy strategy = RqStrategy::kAuto);

// Sums the codewords of the first `levels` columns of codes (row stride ldc) into out (n rows of
// d floats, row stride ldo >= d). Throws std::out_of_range naming the row and level of a code
// outside [0, k); rows before it may already be written. Outputs larger than the caller's caches
// are written with streaming (non-temporal) stores, which skip reading the destination first.
template <class CodeT>
void rq_decode_cpu(const CodeT* codes, int64_t n, int64_t ldc, int64_t levels,
                   const float* codebooks, int64_t k, int64_t d, float* out, int64_t ldo);

}  // namespace sigma_fast
