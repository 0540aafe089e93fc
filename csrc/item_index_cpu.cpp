#include "item_index_cpu.h"

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"

namespace sigma_fast {

bool l2_normalize_row(const float* q, int64_t d, float* out) {
  double s = 0.0;
  for (int64_t t = 0; t < d; ++t) s += static_cast<double>(q[t]) * q[t];
  const double norm = std::sqrt(s);
  if (!(norm > 0.0) || !std::isfinite(norm)) return false;
  for (int64_t t = 0; t < d; ++t) out[t] = static_cast<float>(static_cast<double>(q[t]) / norm);
  return true;
}

void item_index_build_cpu(const float* emb, int64_t n, int64_t d, int64_t lde,
                          const int64_t* bucket, int64_t num_buckets, const int64_t* ids,
                          float* out_emb, int64_t* offsets, int64_t* out_ids,
                          int64_t* positions) {
  require(n >= 0 && d >= 1 && num_buckets >= 1,
          "item_index_build: expected n >= 0, d >= 1, num_buckets >= 1");
  require(lde >= d, "item_index_build: row stride of embeddings must be >= d");
  // Counting sort by bucket, stable in item order.
  std::vector<int64_t> count(static_cast<size_t>(num_buckets) + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t u = bucket[i];
    if (u < 0 || u >= num_buckets)
      throw std::out_of_range("prefix bucket of item " + std::to_string(i) + " is " +
                              std::to_string(u) + ", outside [0, " +
                              std::to_string(num_buckets) + ")");
    ++count[static_cast<size_t>(u) + 1];
  }
  offsets[0] = 0;
  for (int64_t u = 0; u < num_buckets; ++u) offsets[u + 1] = offsets[u] + count[u + 1];
  std::vector<int64_t> next(offsets, offsets + num_buckets);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = next[static_cast<size_t>(bucket[i])]++;
    positions[i] = row;
    out_ids[row] = ids ? ids[i] : i;
  }
  // Normalise into place; the first bad row (in item order) is reported whatever the threads.
  std::atomic<int64_t> first_bad{n};
  parallel_for(n, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (!l2_normalize_row(emb + i * lde, d, out_emb + positions[i] * d)) {
        int64_t cur = first_bad.load();
        while (i < cur && !first_bad.compare_exchange_weak(cur, i)) {
        }
        return;
      }
    }
  });
  const int64_t bad = first_bad.load();
  if (bad < n) {
    const float* row = emb + bad * lde;
    bool finite = true;
    for (int64_t t = 0; t < d; ++t) finite = finite && std::isfinite(row[t]);
    throw std::invalid_argument(
        "embeddings must be finite, non-zero rows (they are L2-normalised); row " +
        std::to_string(bad) + (finite ? " is all zeros" : " has a non-finite value"));
  }
}

}  // namespace sigma_fast
