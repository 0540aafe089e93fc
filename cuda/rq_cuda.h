// Residual quantization on CUDA (torch-free). The layout and checks shared with the CPU twin
// are in csrc/rq.h; semantics: python/sigma_fast/reference/rq.py; structure and tie rules
// mirror the CPU twin, csrc/rq_cpu.h.
//
// Every entry point takes device pointers, sizes, strides and the stream to launch on. Nothing
// here synchronizes with the host or allocates: the caller owns all memory, including the
// encoder's scratch (see rq_encode_cuda_workspace_bytes). Bad sizes or pointers throw
// std::invalid_argument before anything is launched; a failed launch throws
// std::runtime_error carrying cudaGetErrorString.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "rq.h"

namespace sigma_fast {

// Bytes of device scratch rq_encode_cuda needs for these sizes (0 when n == 0).
//
// Rows are encoded in chunks of m vectors, m chosen so that the scratch stays within
// kRqWorkspaceBudget; when a single vector needs more than that (huge beam_width * (d + k)),
// m = 1 and the scratch is whatever one vector needs. With B' = min(beam_width, k^levels):
//   greedy (beam_width == 1):  4*levels*k + 4*m*d                     (+ alignment)
//   beam:                      4*levels*k + m*B'*(8*d + 4*k + 8*levels + 32)  (+ alignment)
// Alignment: every array starts on a 256-byte boundary, plus 256 bytes to align the base.
// e.g. n = 1e6, d = 256, k = 256, levels = 4: greedy m = 262,136 rows, beam 16 m = 5,349
// vectors, both just under 256 MiB; for n = 1000 greedy needs 1,028,352 bytes.
// Throws std::invalid_argument for sizes rq_encode_cuda rejects.
int64_t rq_encode_cuda_workspace_bytes(int64_t n, int64_t d, int64_t levels, int64_t k,
                                       int64_t beam_width);

constexpr int64_t kRqWorkspaceBudget = int64_t{256} << 20;

// Encodes n rows of x (width d, row stride ldx >= d, all on the device) with `levels`
// codebooks of k codewords each (codebooks is levels x k x d, contiguous). Greedy for
// beam_width == 1, beam search otherwise. codes: n x levels, contiguous. err (nullable): squared
// norm of each row's final residual. workspace: workspace_bytes >= rq_encode_cuda_workspace_bytes
// bytes of device memory, any alignment. Deterministic: the same inputs give the same outputs.
void rq_encode_cuda(const float* x, int64_t n, int64_t d, int64_t ldx, const float* codebooks,
                    int64_t levels, int64_t k, int64_t beam_width, int64_t* codes, float* err,
                    void* workspace, int64_t workspace_bytes, cudaStream_t stream);

// out (n x d, contiguous) = sum over l < levels of codebooks[l, codes[i * ldc + l]], summed in
// level order in float32 from 0. Codes must be in [0, k) (the Python layer checks); a code
// outside that range is skipped rather than read out of bounds. CodeT is int32_t or int64_t.
template <class CodeT>
void rq_decode_cuda(const CodeT* codes, int64_t n, int64_t ldc, int64_t levels,
                    const float* codebooks, int64_t k, int64_t d, float* out,
                    cudaStream_t stream);

}  // namespace sigma_fast
