// Adaptive probabilistic fusion (APF) on the CPU (torch-free): in-bucket retrieval, per-bucket
// softmax and the global top-N in one call. The argument structs, shared with the CUDA twin, are
// in apf.h; semantics: python/sigma_fast/reference/apf.py; the index layout is described in
// item_index.h.
#pragma once

#include <cstdint>

#include "apf.h"

namespace sigma_fast {

// prefix_scores float32 [B, K] (-inf: missing beam), prefix_ids int64 [B, K], queries float32
// [B, K, D], all contiguous; index.emb_type must be kFloat32. Outputs (contiguous,
// caller-allocated): out_ids int64 [B, N] (-1 padding), out_logp float32 [B, N] (-inf padding),
// out_src int64 [B, N] (the beam k each result came from, -1 padding); bucket_ids int64
// [B, K, M] and bucket_sims float32 [B, K, M] (nullable; -1 / -inf padding) receive every
// beam's top-M list, best first.
//
// Work plan (no B x K x bucket score matrix is ever built):
//  1. every (b, k) with a finite score and a non-empty bucket is a "pair"; pairs are grouped by
//     bucket, so one pass over a bucket's rows serves every query that targets it;
//  2. tasks = (bucket, up to 64 of its pairs, a fixed 4096-row chunk of the bucket), run by a
//     dynamic pool; each task computes the chunk's row x query inner products (a
//     register-tiled 4-row x 3-query kernel vectorised along D, so a bucket searched by one
//     beam costs D / 8 FMAs per row) and then streams them into one bounded heap per pair and
//     chunk (plus an online logsumexp for normalize_bucket);
//  3. per request (threaded over b): merge each pair's chunk heaps into its top M, apply the
//     softmax, and select the global top N.
// The chunking depends only on the bucket sizes and each inner product is evaluated in one
// fixed order, so results depend neither on the thread count nor on the other requests in the
// batch.
void apf_fuse_cpu(const float* prefix_scores, const int64_t* prefix_ids, const float* queries,
                  int64_t batch, int64_t k, const ApfIndex& index, const ApfMask& allowed,
                  const ApfParams& params, int64_t* out_ids, float* out_logp, int64_t* out_src,
                  int64_t* bucket_ids, float* bucket_sims);

}  // namespace sigma_fast
