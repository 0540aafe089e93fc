// Adaptive probabilistic fusion (apf_fuse): the argument structs and checks shared by the CPU
// twin (apf_cpu.h) and the CUDA twin (cuda/apf_cuda.h). Torch-free and CUDA-free: it compiles
// with a plain C++17 compiler and with nvcc. Semantics: python/sigma_fast/reference/apf.py.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace sigma_fast {

// Element type of the index embeddings (similarities are accumulated in fp32 either way). The
// values are the bindings' int codes. The CPU twin takes float32 only.
enum class ApfEmbType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The index tensors (layout: item_index.h), all contiguous and on the backend's device.
struct ApfIndex {
  const void* embeddings;  // num_items x dim of `emb_type`, rows L2-normalised
  ApfEmbType emb_type;
  int64_t num_items, dim;
  const int64_t* offsets;   // num_buckets + 1
  int64_t num_buckets;
  const int64_t* item_ids;  // num_items, caller ids in storage order
};

// Allowed-item masks indexed by caller item id: request b reads data + b * ld (ld = 0 for one
// mask shared by every request). data == nullptr allows everything. An item id >= length is an
// error on the CPU (std::out_of_range, found while scanning) and counts as not allowed on a
// device (which cannot report it; the Python layer sizes masks by the index's id bound, so it
// never happens there).
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

// The checks every backend makes before touching memory (batch requests of k beams each); each
// adds the size limits of its own kernel. Throws std::invalid_argument.
inline void check_apf_args(int64_t batch, int64_t k, const ApfIndex& index,
                           const ApfMask& allowed, const ApfParams& params) {
  if (!(batch >= 0 && k >= 0 && index.dim >= 1 && index.num_buckets >= 1 &&
        index.num_items >= 0))
    throw std::invalid_argument(
        "apf_fuse: expected B >= 0, K >= 0, D >= 1, num_buckets >= 1, num_items >= 0; got B=" +
        std::to_string(batch) + " K=" + std::to_string(k) + " D=" + std::to_string(index.dim) +
        " num_buckets=" + std::to_string(index.num_buckets) +
        " num_items=" + std::to_string(index.num_items));
  if (params.top_m < 1 || params.top_n < 1)
    throw std::invalid_argument("apf_fuse: top_m and top_n must be >= 1; got top_m=" +
                                std::to_string(params.top_m) +
                                " top_n=" + std::to_string(params.top_n));
  if (!(params.tau > 0.0 && std::isfinite(params.tau)))
    throw std::invalid_argument("apf_fuse: tau must be finite and > 0");
  if (!(params.sigma_min >= 0.0 && std::isfinite(params.sigma_min)))
    throw std::invalid_argument("apf_fuse: sigma_min must be finite and >= 0");
  if (allowed.data != nullptr && (allowed.ld < 0 || allowed.length < 0))
    throw std::invalid_argument("apf_fuse: bad allowed-mask layout (negative ld or length)");
}

}  // namespace sigma_fast
