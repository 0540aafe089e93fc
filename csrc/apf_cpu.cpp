#include "apf_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SIGMA_FAST_X86 1
#endif

#include "common.h"
#include "item_index_cpu.h"

namespace sigma_fast {
namespace {

// Rows per task: fixed, so results never depend on threads. A task computes the similarities
// of its whole chunk before any heap work, so the rows stream from memory without
// interruption (interleaving the heap pass with short row blocks stalls the prefetcher).
constexpr int64_t kRowChunk = 4096;
constexpr int64_t kMaxQueries = 64;  // queries per task: at most 1 MiB of similarities

// ------------------------------------------------------------------ similarity micro-kernels
// s[j * lds + i] = <rows[i], q[j]> (rows and queries contiguous, width d; query-major, so the
// heap pass reads each query's similarities contiguously). Every product is
// evaluated the same way whatever tile it falls in: 8 float lanes, lane l accumulating
// t = l, l + 8, ... by FMA in t order, the lanes summed in a fixed tree, then the d % 8 tail
// added by FMA in t order. So a (row, query) similarity does not depend on which other queries
// of the batch share its bucket, nor on threads. Unlike dot_panels (16 queries per panel), a
// bucket searched by a single beam costs d / 8 FMAs per row, not 2·d: the scan stays
// memory-bound. The generic kernel (machines without AVX2/FMA) has its own, equally fixed order.
constexpr int kTileRows = 4, kTileQueries = 3;
using SimTile = void (*)(const float*, const float*, int64_t, float*, int64_t);

template <int R, int Q>
void sim_tile_generic(const float* rows, const float* q, int64_t d, float* s, int64_t lds) {
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < Q; ++j) {
      float lane[8] = {};
      const int64_t d8 = d & ~int64_t{7};
      for (int64_t t = 0; t < d8; t += 8)
        for (int l = 0; l < 8; ++l) lane[l] += rows[r * d + t + l] * q[j * d + t + l];
      float v = ((lane[0] + lane[4]) + (lane[2] + lane[6])) +
                ((lane[1] + lane[5]) + (lane[3] + lane[7]));
      for (int64_t t = d8; t < d; ++t) v += rows[r * d + t] * q[j * d + t];
      s[j * lds + r] = v;
    }
  }
}

#ifdef SIGMA_FAST_X86
__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // l, l + 4
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));                                          // + l + 2
  x = _mm_add_ss(x, _mm_movehdup_ps(x));                                           // + l + 1
  return _mm_cvtss_f32(x);
}

template <int R, int Q>
__attribute__((target("avx2,fma"))) void sim_tile_avx2(const float* rows, const float* q,
                                                        int64_t d, float* s, int64_t lds) {
  __m256 acc[R][Q];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < Q; ++j) acc[r][j] = _mm256_setzero_ps();
  const int64_t d8 = d & ~int64_t{7};
  for (int64_t t = 0; t < d8; t += 8) {
    __m256 qv[Q];
    for (int j = 0; j < Q; ++j) qv[j] = _mm256_loadu_ps(q + j * d + t);
    for (int r = 0; r < R; ++r) {
      const __m256 rv = _mm256_loadu_ps(rows + r * d + t);
      for (int j = 0; j < Q; ++j) acc[r][j] = _mm256_fmadd_ps(rv, qv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < Q; ++j) {
      __m128 v = _mm_set_ss(hsum8(acc[r][j]));
      for (int64_t t = d8; t < d; ++t)
        v = _mm_fmadd_ss(_mm_set_ss(rows[r * d + t]), _mm_set_ss(q[j * d + t]), v);
      s[j * lds + r] = _mm_cvtss_f32(v);
    }
  }
}

bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

template <int R, int Q>
struct GenericTile {
  static constexpr SimTile fn = &sim_tile_generic<R, Q>;
};
#ifdef SIGMA_FAST_X86
template <int R, int Q>
struct Avx2Tile {
  static constexpr SimTile fn = &sim_tile_avx2<R, Q>;
};
#endif

template <template <int, int> class K>
struct TileTable {
  SimTile fn[kTileRows][kTileQueries] = {
      {K<1, 1>::fn, K<1, 2>::fn, K<1, 3>::fn},
      {K<2, 1>::fn, K<2, 2>::fn, K<2, 3>::fn},
      {K<3, 1>::fn, K<3, 2>::fn, K<3, 3>::fn},
      {K<4, 1>::fn, K<4, 2>::fn, K<4, 3>::fn},
  };
};

const SimTile (&sim_tiles())[kTileRows][kTileQueries] {
#ifdef SIGMA_FAST_X86
  static const TileTable<Avx2Tile> avx2;
  if (cpu_has_avx2_fma()) return avx2.fn;
#endif
  static const TileTable<GenericTile> generic;
  return generic.fn;
}

// m rows x nq queries (both contiguous with width d) into s, query-major with stride lds.
void similarities(const float* rows, int64_t m, const float* q, int64_t nq, int64_t d, float* s,
                  int64_t lds) {
  static const auto& tiles = sim_tiles();
  for (int64_t i0 = 0; i0 < m; i0 += kTileRows) {
    const int64_t r = std::min<int64_t>(kTileRows, m - i0);
    for (int64_t j0 = 0; j0 < nq; j0 += kTileQueries) {
      const int64_t c = std::min<int64_t>(kTileQueries, nq - j0);
      tiles[r - 1][c - 1](rows + i0 * d, q + j0 * d, d, s + j0 * lds + i0, lds);
    }
  }
}
constexpr double kInf = std::numeric_limits<double>::infinity();

std::string at(int64_t b, int64_t k) {
  return "[" + std::to_string(b) + ", " + std::to_string(k) + "]";
}

// A retrieved item: cosine similarity and caller id. Order: larger sim first, then smaller id.
struct Cand {
  float sim;
  int64_t id;
};
struct Better {  // a function object, so the heap and sort calls inline it
  bool operator()(const Cand& a, const Cand& b) const {
    return a.sim > b.sim || (a.sim == b.sim && a.id < b.id);
  }
};
constexpr Better better{};

// Bounded heap of the `cap` best candidates seen so far; h[0] is the worst one kept, so most
// rows of a long bucket are rejected by one comparison.
inline void heap_push(Cand* h, int64_t& size, int64_t cap, Cand c) {
  if (size < cap) {
    h[size++] = c;
    std::push_heap(h, h + size, better);
  } else if (better(c, h[0])) {
    std::pop_heap(h, h + size, better);
    h[size - 1] = c;
    std::push_heap(h, h + size, better);
  }
}

// Online logsumexp: exp(mx) * sum == sum_i exp(x_i).
inline void lse_add(double x, double& mx, double& sum) {
  if (x <= mx) {
    sum += std::exp(x - mx);
  } else {
    sum = sum * std::exp(mx - x) + 1.0;
    mx = x;
  }
}
inline void lse_merge(double mx2, double sum2, double& mx, double& sum) {
  if (sum2 == 0.0) return;
  if (mx2 <= mx) {
    sum += sum2 * std::exp(mx2 - mx);
  } else {
    sum = sum * std::exp(mx - mx2) + sum2;
    mx = mx2;
  }
}

struct Pair {
  int64_t bucket, b, k;
};

// The partial result of one (pair, row chunk): a heap in `store` plus the chunk's logsumexp.
struct Slot {
  int64_t base = 0, cap = 0, count = 0;
  double lse_max = -kInf, lse_sum = 0.0;
};

struct Task {
  int64_t p0, p1;      // pairs [p0, p1), all on one bucket
  int64_t row0, row1;  // storage rows of one chunk of that bucket
  int64_t chunk;       // chunk number within the bucket
  double cost;
};

// A fused candidate: log-probability, caller id, source beam.
struct Result {
  double logp;
  int64_t id, k;
};
struct ResultBetter {
  bool operator()(const Result& a, const Result& b) const {
    if (a.logp != b.logp) return a.logp > b.logp;
    if (a.id != b.id) return a.id < b.id;
    return a.k < b.k;
  }
};
constexpr ResultBetter result_better{};

}  // namespace

void apf_fuse_cpu(const float* prefix_scores, const int64_t* prefix_ids, const float* queries,
                  int64_t batch, int64_t k, const ApfIndex& index, const ApfMask& allowed,
                  const ApfParams& params, int64_t* out_ids, float* out_logp, int64_t* out_src,
                  int64_t* bucket_ids, float* bucket_sims) {
  check_apf_args(batch, k, index, allowed, params);
  require(index.emb_type == ApfEmbType::kFloat32, "apf_fuse (cpu): embeddings must be float32");
  const int64_t B = batch, K = k, D = index.dim, M = params.top_m, N = params.top_n;
  const int64_t U = index.num_buckets;
  const float* embeddings = static_cast<const float*>(index.embeddings);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::fill(out_ids, out_ids + B * N, int64_t{-1});
  std::fill(out_logp, out_logp + B * N, neg_inf);
  std::fill(out_src, out_src + B * N, int64_t{-1});
  if (bucket_ids) std::fill(bucket_ids, bucket_ids + B * K * M, int64_t{-1});
  if (bucket_sims) std::fill(bucket_sims, bucket_sims + B * K * M, neg_inf);
  if (B == 0 || K == 0) return;

  // Temperatures t_b and the pairs to search, in (b, k) order.
  std::vector<double> temp(static_cast<size_t>(B), 0.0);
  std::vector<Pair> pairs;
  for (int64_t b = 0; b < B; ++b) {
    double sum = 0.0;
    int64_t n = 0;
    for (int64_t j = 0; j < K; ++j) {
      const float phi = prefix_scores[b * K + j];
      if (std::isnan(phi) || phi == -neg_inf)
        throw std::invalid_argument("prefix_scores" + at(b, j) + " must be finite or -inf; got " +
                                    std::to_string(phi));
      if (phi == neg_inf) continue;
      const int64_t u = prefix_ids[b * K + j];
      if (u < 0 || u >= U)
        throw std::out_of_range("prefix_ids" + at(b, j) + " must lie in [0, " +
                                std::to_string(U) + "); got " + std::to_string(u));
      sum += phi;
      ++n;
      if (index.offsets[u + 1] > index.offsets[u]) pairs.push_back({u, b, j});
    }
    if (n == 0) continue;
    if (params.adaptive) {
      const double mean = sum / static_cast<double>(n);
      double var = 0.0;
      for (int64_t j = 0; j < K; ++j) {
        const float phi = prefix_scores[b * K + j];
        if (phi != neg_inf) var += (phi - mean) * (phi - mean);
      }
      const double sigma = std::sqrt(var / static_cast<double>(n));
      temp[b] = std::max(sigma, params.sigma_min) / params.tau;
    } else {
      temp[b] = 1.0 / params.tau;
    }
  }
  // Group by bucket; stable, so within a bucket pairs stay in (b, k) order.
  std::stable_sort(pairs.begin(), pairs.end(),
                   [](const Pair& x, const Pair& y) { return x.bucket < y.bucket; });
  const int64_t P = static_cast<int64_t>(pairs.size());
  std::vector<int64_t> pair_of(static_cast<size_t>(B * K), -1);
  std::vector<float> qn(static_cast<size_t>(P * D));
  for (int64_t p = 0; p < P; ++p) {
    const Pair& pr = pairs[p];
    pair_of[pr.b * K + pr.k] = p;
    if (!l2_normalize_row(queries + (pr.b * K + pr.k) * D, D, qn.data() + p * D))
      throw std::invalid_argument("queries" + at(pr.b, pr.k) +
                                  " must be finite and non-zero where prefix_scores is finite");
  }

  // One slot per (pair, row chunk); heaps hold at most min(M, chunk rows) candidates.
  std::vector<int64_t> slot_begin(static_cast<size_t>(P) + 1, 0);
  std::vector<Slot> slots;
  int64_t store_size = 0;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t r0 = index.offsets[pairs[p].bucket], r1 = index.offsets[pairs[p].bucket + 1];
    for (int64_t c0 = r0; c0 < r1; c0 += kRowChunk) {
      Slot s;
      s.base = store_size;
      s.cap = std::min(M, std::min(kRowChunk, r1 - c0));
      store_size += s.cap;
      slots.push_back(s);
    }
    slot_begin[p + 1] = static_cast<int64_t>(slots.size());
  }
  std::vector<Cand> store(static_cast<size_t>(store_size));

  std::vector<Task> tasks;
  for (int64_t g0 = 0; g0 < P;) {
    int64_t g1 = g0;
    while (g1 < P && pairs[g1].bucket == pairs[g0].bucket) ++g1;
    const int64_t r0 = index.offsets[pairs[g0].bucket], r1 = index.offsets[pairs[g0].bucket + 1];
    for (int64_t q0 = g0; q0 < g1; q0 += kMaxQueries) {
      const int64_t q1 = std::min(q0 + kMaxQueries, g1);
      int64_t chunk = 0;
      for (int64_t c0 = r0; c0 < r1; c0 += kRowChunk, ++chunk) {
        const int64_t c1 = std::min(c0 + kRowChunk, r1);
        // Cost: streaming the rows, then per query the products and the heap work.
        const double cost = static_cast<double>(c1 - c0) * (D + (D / 8.0 + 8.0) * (q1 - q0));
        tasks.push_back({q0, q1, c0, c1, chunk, cost});
      }
    }
    g0 = g1;
  }
  // Longest first, for balance under the dynamic pool (ties by creation order).
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& x, const Task& y) { return x.cost > y.cost; });

  const int64_t T = static_cast<int64_t>(tasks.size());
  double total_cost = 0.0;
  int64_t dots_size = 0;
  for (const Task& task : tasks) {
    total_cost += task.cost;
    dots_size = std::max(dots_size, (task.row1 - task.row0) * (task.p1 - task.p0));
  }
  // One worker per share of work large enough to pay for starting it: the cost of 16k rows of
  // D = 128 searched by one query.
  constexpr double kCostPerWorker = 16384.0 * (128.0 + 128.0 / 8.0 + 8.0);
  const int64_t workers = std::min<int64_t>(
      {static_cast<int64_t>(get_num_threads()), T,
       std::max<int64_t>(1, static_cast<int64_t>(total_cost / kCostPerWorker))});
  std::atomic<int64_t> next{0};
  parallel_for(workers, 1, [&](int64_t w0, int64_t w1) {
    std::unique_ptr<float[]> dots(new float[static_cast<size_t>(std::max<int64_t>(dots_size, 1))]);
    for (int64_t w = w0; w < w1; ++w) {
      for (int64_t ti; (ti = next.fetch_add(1)) < T;) {
        const Task& task = tasks[ti];
        const int64_t nq = task.p1 - task.p0, m = task.row1 - task.row0;
        similarities(embeddings + task.row0 * D, m, qn.data() + task.p0 * D, nq, D,
                     dots.get(), m);
        const int64_t* ids = index.item_ids + task.row0;
        for (int64_t j = 0; j < nq; ++j) {
          const Pair& pr = pairs[task.p0 + j];
          Slot& slot = slots[slot_begin[task.p0 + j] + task.chunk];
          Cand* heap = store.data() + slot.base;
          const uint8_t* mask = allowed.data ? allowed.data + pr.b * allowed.ld : nullptr;
          const double t = temp[pr.b];
          const float* col = dots.get() + j * m;
          for (int64_t i = 0; i < m; ++i) {
            const int64_t id = ids[i];
            if (mask) {
              if (static_cast<uint64_t>(id) >= static_cast<uint64_t>(allowed.length))
                throw std::out_of_range("item id " + std::to_string(id) +
                                        " is outside the allowed mask (length " +
                                        std::to_string(allowed.length) + ")");
              if (!mask[id]) continue;
            }
            const float s = col[i];
            if (params.normalize_bucket) lse_add(t * s, slot.lse_max, slot.lse_sum);
            heap_push(heap, slot.count, slot.cap, Cand{s, id});
          }
        }
      }
    }
  });

  // Per request: each beam's top M, its softmax, and the global top N.
  parallel_for(B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<Cand> merged;
    std::vector<Result> results;
    std::vector<int64_t> seen_buckets;
    for (int64_t b = b0; b < b1; ++b) {
      results.clear();
      seen_buckets.clear();
      const double t = temp[b];
      for (int64_t j = 0; j < K; ++j) {
        const int64_t p = pair_of[b * K + j];
        if (p < 0) continue;
        merged.clear();
        double mx = -kInf, sum = 0.0;
        for (int64_t s = slot_begin[p]; s < slot_begin[p + 1]; ++s) {
          const Slot& slot = slots[s];
          merged.insert(merged.end(), store.begin() + slot.base,
                        store.begin() + slot.base + slot.count);
          lse_merge(slot.lse_max, slot.lse_sum, mx, sum);
        }
        const int64_t kept = std::min<int64_t>(M, static_cast<int64_t>(merged.size()));
        if (kept == 0) continue;  // every item of the bucket is masked out
        std::partial_sort(merged.begin(), merged.begin() + kept, merged.end(), better);
        seen_buckets.push_back(pairs[p].bucket);
        if (!params.normalize_bucket) {
          mx = t * merged[0].sim;  // the largest, as t >= 0
          sum = 0.0;
          for (int64_t i = 0; i < kept; ++i) sum += std::exp(t * merged[i].sim - mx);
        }
        const double lse = mx + std::log(sum);
        const double phi = prefix_scores[b * K + j];
        for (int64_t i = 0; i < kept; ++i)
          results.push_back({phi + t * merged[i].sim - lse, merged[i].id, j});
        if (bucket_ids) {
          for (int64_t i = 0; i < kept; ++i) bucket_ids[(b * K + j) * M + i] = merged[i].id;
        }
        if (bucket_sims) {
          for (int64_t i = 0; i < kept; ++i) bucket_sims[(b * K + j) * M + i] = merged[i].sim;
        }
      }
      // An item can come from two beams only when they search the same bucket.
      std::sort(seen_buckets.begin(), seen_buckets.end());
      if (params.dedup &&
          std::adjacent_find(seen_buckets.begin(), seen_buckets.end()) != seen_buckets.end()) {
        std::sort(results.begin(), results.end(), [](const Result& x, const Result& y) {
          return x.id != y.id ? x.id < y.id : result_better(x, y);
        });
        results.erase(std::unique(results.begin(), results.end(),
                                  [](const Result& x, const Result& y) { return x.id == y.id; }),
                      results.end());
      }
      const int64_t n_out = std::min<int64_t>(N, static_cast<int64_t>(results.size()));
      std::partial_sort(results.begin(), results.begin() + n_out, results.end(), result_better);
      for (int64_t i = 0; i < n_out; ++i) {
        out_ids[b * N + i] = results[i].id;
        out_logp[b * N + i] = static_cast<float>(results[i].logp);
        out_src[b * N + i] = results[i].k;
      }
    }
  });
}

}  // namespace sigma_fast
