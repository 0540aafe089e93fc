// Adaptive probabilistic fusion (APF) on the CPU (torch-free): in-bucket retrieval, per-bucket
// softmax and the global top-N in one call. Semantics: python/sigma_fast/reference/apf.py; the
// index layout is described in item_index_cpu.h.
#pragma once

#include <cstdint>

namespace sigma_fast {

// The index tensors (see item_index_cpu.h), all contiguous.
struct ApfIndex {
  const float* embeddings;  // num_items x dim, rows L2-normalised
  int64_t num_items, dim;
  const int64_t* offsets;   // num_buckets + 1
  int64_t num_buckets;
  const int64_t* item_ids;  // num_items, caller ids in storage order
};

// Allowed-item masks indexed by caller item id: request b reads data + b * ld (ld = 0 for one
// mask shared by every request). data == nullptr allows everything. Every item id must be
// < length (checked while scanning; std::out_of_range otherwise).
struct ApfMask {
  const uint8_t* data;  // bool bytes: 0 = not allowed
  int64_t ld, length;
};

struct ApfParams {
  int64_t top_m, top_n;
  double tau;               // > 0
  bool adaptive;            // t_b = max(std(phi_b), sigma_min) / tau, else 1 / tau
  double sigma_min;         // >= 0
  bool normalize_bucket;    // logsumexp over the whole allowed bucket instead of the top M
  bool dedup;               // an item reachable from two beams keeps its best log P once
};

// prefix_scores float32 [B, K] (-inf: missing beam), prefix_ids int64 [B, K], queries float32
// [B, K, D], all contiguous. Outputs (contiguous, caller-allocated): out_ids int64 [B, N]
// (-1 padding), out_logp float32 [B, N] (-inf padding), out_src int64 [B, N] (the beam k each
// result came from, -1 padding); bucket_ids int64 [B, K, M] and bucket_sims float32 [B, K, M]
// (nullable; -1 / -inf padding) receive every beam's top-M list, best first.
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
