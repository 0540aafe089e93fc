// The item index that apf_fuse searches (item_index_build): the layout of its tensors and the
// check of its offsets. Torch-free and CUDA-free. The builder is item_index_cpu.h; Python:
// sigma_fast/index.py.
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
#include <stdexcept>
#include <string>

namespace sigma_fast {

// Checks what the kernels' memory safety depends on: offsets[0] == 0, non-decreasing,
// offsets[num_buckets] == n. Throws std::invalid_argument naming the first violation.
// Reads the offsets, so host memory only (the CPU APF binding checks an index with it before
// searching it).
inline void check_offsets(const int64_t* offsets, int64_t num_buckets, int64_t n) {
  if (num_buckets < 0) throw std::invalid_argument("offsets: expected num_buckets >= 0");
  if (offsets[0] != 0)
    throw std::invalid_argument("offsets[0] must be 0; got " + std::to_string(offsets[0]));
  for (int64_t u = 0; u < num_buckets; ++u) {
    if (offsets[u + 1] < offsets[u])
      throw std::invalid_argument("offsets must be non-decreasing; got offsets[" +
                                  std::to_string(u + 1) + "] = " + std::to_string(offsets[u + 1]) +
                                  " < offsets[" + std::to_string(u) +
                                  "] = " + std::to_string(offsets[u]));
  }
  if (offsets[num_buckets] != n)
    throw std::invalid_argument("offsets[-1] must equal the number of items (" +
                                std::to_string(n) + "); got " +
                                std::to_string(offsets[num_buckets]));
}

}  // namespace sigma_fast
