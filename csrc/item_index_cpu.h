// Building the item index that apf_fuse searches (torch-free). Python: sigma_fast/index.py.
//
// Index layout, shared by every backend (CUDA / Triton kernels read exactly these tensors):
//   embeddings  float32 [N, D], row-major and contiguous. Rows are L2-normalised and grouped by
//               bucket: bucket u owns storage rows offsets[u] .. offsets[u+1]-1, in the order
//               the items were given (a stable sort by bucket id).
//   offsets     int64 [U + 1]: offsets[0] = 0, non-decreasing, offsets[U] = N. Empty buckets
//               have offsets[u] == offsets[u+1].
//   item_ids    int64 [N]: the caller's id of each storage row (unique, >= 0). Allowed-item
//               masks and tie rules use these ids, never storage rows.
//   positions   int64 [N]: the storage row of input item i (the inverse of the stable sort).
#pragma once

#include <cstdint>

namespace sigma_fast {

// Writes q / ||q|| into out (d floats), with ||q|| accumulated in double in t order and each
// element divided in double. Returns false (writing nothing) when q is all zeros or the norm
// is not finite.
bool l2_normalize_row(const float* q, int64_t d, float* out);

// Builds the layout above from n input rows (row stride lde) with bucket[i] in
// [0, num_buckets) and ids[i] (nullable: ids = 0..n-1). Outputs are caller-allocated:
// out_emb n x d contiguous, offsets num_buckets + 1, out_ids n, positions n.
// Throws std::out_of_range for a bucket id outside [0, num_buckets) and std::invalid_argument
// for a zero or non-finite row, naming the row.
void item_index_build_cpu(const float* emb, int64_t n, int64_t d, int64_t lde,
                          const int64_t* bucket, int64_t num_buckets, const int64_t* ids,
                          float* out_emb, int64_t* offsets, int64_t* out_ids, int64_t* positions);

// Checks what the kernels' memory safety depends on: offsets[0] == 0, non-decreasing,
// offsets[num_buckets] == n. Throws std::invalid_argument naming the first violation.
void check_offsets(const int64_t* offsets, int64_t num_buckets, int64_t n);

}  // namespace sigma_fast
