// Building the item index that apf_fuse searches, on the CPU (torch-free). The layout of the
// index is in item_index.h; Python: sigma_fast/index.py.
#pragma once

#include <cstdint>

#include "item_index.h"

namespace sigma_fast {

// Writes q / ||q|| into out (d floats), with ||q|| accumulated in double in t order and each
// element divided in double. Returns false (writing nothing) when q is all zeros or the norm
// is not finite.
bool l2_normalize_row(const float* q, int64_t d, float* out);

// Builds the layout of item_index.h from n input rows (row stride lde) with bucket[i] in
// [0, num_buckets) and ids[i] (nullable: ids = 0..n-1). Outputs are caller-allocated:
// out_emb n x d contiguous, offsets num_buckets + 1, out_ids n, positions n.
// Throws std::out_of_range for a bucket id outside [0, num_buckets) and std::invalid_argument
// for a zero or non-finite row, naming the row.
void item_index_build_cpu(const float* emb, int64_t n, int64_t d, int64_t lde,
                          const int64_t* bucket, int64_t num_buckets, const int64_t* ids,
                          float* out_emb, int64_t* offsets, int64_t* out_ids, int64_t* positions);

}  // namespace sigma_fast
