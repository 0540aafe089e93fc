// Adaptive probabilistic fusion (APF) on CUDA (torch-free). The argument structs, shared with
// the CPU twin, are in csrc/apf.h; semantics: python/sigma_fast/reference/apf.py; precision
// and tie rules mirror the CPU twin, csrc/apf_cpu.h (similarities in fp32, temperatures,
// softmax and log P in fp64; top-M ties go to the smaller item id, top-N ties to the smaller
// item id, then the smaller beam). Embeddings may be float32, float16 or bfloat16
// (index.emb_type).
//
// Two launches on the caller's stream, no host synchronisation, no allocation:
//   1. one block per (b, k): normalise the query, scan the bucket's rows (one warp per row,
//      fp32 FMAs, no TF32), keep a running top-M in the workspace (rows arrive in tiles; the
//      tile's survivors are rank-sorted and merged into the list), plus the logsumexp over
//      every allowed row for normalize_bucket; writes the optional per-bucket outputs;
//   2. one block per request: the per-beam softmax, dedup flags, and the global top-N by
//      repeated block-wide extraction of the next best candidate.
// Every reduction has a fixed shape and order, so results are deterministic run to run.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "apf.h"

namespace sigma_fast {

// Bytes of device scratch apf_fuse_cuda needs (0 when batch or k is 0). Linear in
// batch * k * (top_m + dim): per (b, k) the top-M list twice (double buffer, 12 bytes an
// entry), its log P (8) and dedup flag (1) per entry, the normalised query (4 * dim) and
// 16 bytes of counts and logsumexp; every array 256-byte aligned, plus 256 bytes of slack.
// Throws std::invalid_argument for sizes apf_fuse_cuda rejects.
int64_t apf_fuse_cuda_workspace_bytes(int64_t batch, int64_t k, int64_t dim, int64_t top_m);

// prefix_scores float32 [B, K] (-inf: missing beam), prefix_ids int64 [B, K], queries float32
// [B, K, D]: contiguous, on the device. Values are validated by the caller (finite or -inf
// scores, bucket ids in range where the score is finite, finite non-zero queries there); a
// bucket id out of range is skipped rather than read. Outputs (contiguous): out_ids int64
// [B, N] (-1 padding), out_logp float32 [B, N] (-inf), out_src int64 [B, N] (-1);
// bucket_ids int64 [B, K, M] and bucket_sims float32 [B, K, M] (both nullable; -1 / -inf
// padding). workspace: workspace_bytes >= apf_fuse_cuda_workspace_bytes(...) bytes, any
// alignment. Throws std::invalid_argument for bad sizes (before launching) and
// std::runtime_error carrying cudaGetErrorString for a failed launch.
void apf_fuse_cuda(const float* prefix_scores, const int64_t* prefix_ids, const float* queries,
                   int64_t batch, int64_t k, const ApfIndex& index, const ApfMask& allowed,
                   const ApfParams& params, int64_t* out_ids, float* out_logp,
                   int64_t* out_src, int64_t* bucket_ids, float* bucket_sims, void* workspace,
                   int64_t workspace_bytes, cudaStream_t stream);

}  // namespace sigma_fast
