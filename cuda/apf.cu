// Adaptive probabilistic fusion on CUDA (torch-free). Semantics:
// python/sigma_fast/reference/apf.py; precision and tie rules mirror csrc/apf_cpu.cpp:
// similarities are fp32 FMA chains (no TF32, no tensor cores), temperatures, logsumexps and
// log P are fp64 with explicitly rounded operations (no contraction into FMAs), and log P is
// rounded to fp32 on output.
//
// Launch 1 (apf_scan_kernel, one block per (b, k)):
//   * normalise the query into the workspace (sum of squares in fp64, fixed tree);
//   * walk the bucket in tiles of kTileRows rows, one warp per row: lanes stride over D with
//     fp32 FMAs, then a fixed xor-butterfly sum. A row's similarity therefore does not depend
//     on which warp computed it, so identical rows tie exactly;
//   * rows that are allowed and beat the current M-th best (or any, while fewer than M are
//     kept) are appended to a shared buffer, rank-sorted there by (sim desc, id asc) — the
//     order is total because ids are unique within a bucket, so the atomic append order does
//     not matter — and merged into the running list by rank (each element's output position
//     = its own rank + the number of better elements in the other list, by binary search);
//     the list lives in a double-buffered workspace slot of M entries, so M is unbounded;
//   * normalize_bucket: each warp keeps an online logsumexp of t * s over the rows it scored
//     (a fixed row -> warp assignment), merged over warps in warp order.
// Launch 2 (apf_fuse_kernel, one block per request b):
//   * per beam (one thread each): the softmax over its kept M (or the bucket's logsumexp) and
//     log P of each candidate, into the workspace;
//   * dedup: a candidate is dropped when the same item sits in another beam on the same
//     bucket with a better (log P desc, beam asc) key;
//   * global top N: round r picks, by a fixed-shape block reduction, the best live candidate
//     strictly after round r - 1's pick in (log P desc, id asc, beam asc) order; rounds stop
//     at the first empty one and the rest is padding.
#include "apf_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.h"

namespace sigma_fast {
namespace {

constexpr int kThreads = 256;  // threads per block in both kernels
constexpr int kWarps = kThreads / 32;
constexpr int kTileRows = kThreads;  // rows per scan tile (so at most kThreads survivors)
constexpr int64_t kAlign = 256;      // alignment of every workspace array
constexpr int64_t kMaxScratch = int64_t{1} << 40;  // refuse plans beyond 1 TiB of scratch
constexpr unsigned kFullMask = 0xffffffffu;

// Pointers into the workspace. Lists: slot p = b * K + k holds entries [p * M, (p + 1) * M).
struct Workspace {
  float* sim[2];     // top-M lists, double buffered; the final list ends in buffer 0
  int64_t* id[2];
  int64_t* count;    // [B * K] entries kept (0: skipped beam)
  double* lse;       // [B * K] logsumexp over the allowed bucket (normalize_bucket)
  float* qn;         // [B * K * D] normalised queries
  double* logp;      // [B * K * M] log P of each kept candidate
  uint8_t* live;     // [B * K * M] 1 = takes part in the global top N
};

// ------------------------------------------------------------------------------ device code

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Buffer `which` of a double-buffered list (a select, so the kernel-parameter struct is not
// copied to local memory for a dynamic index).
template <class P>
__device__ __forceinline__ P pick(P a, P b, int which) {
  return which ? b : a;
}

// Top-M order: larger similarity first, then the smaller item id.
__device__ __forceinline__ bool better(float s1, int64_t i1, float s2, int64_t i2) {
  return s1 > s2 || (s1 == s2 && i1 < i2);
}

// Top-N order: larger log P first, then the smaller item id, then the smaller beam.
__device__ __forceinline__ bool result_better(double l1, int64_t i1, int64_t k1, double l2,
                                              int64_t i2, int64_t k2) {
  if (l1 != l2) return l1 > l2;
  if (i1 != i2) return i1 < i2;
  return k1 < k2;
}

// Entries of a best-first list a[0..n) that are better than (s, i).
__device__ __forceinline__ int64_t count_better(const float* as, const int64_t* ai, int64_t n,
                                                float s, int64_t i) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (better(as[mid], ai[mid], s, i))
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// t_b exactly as apf_fuse_cpu computes it (0 for a request without a finite score).
__device__ double request_temperature(const float* phi, int64_t K, const ApfParams& p) {
  double sum = 0.0;
  int64_t n = 0;
  for (int64_t j = 0; j < K; ++j) {
    const float v = phi[j];
    if (v == -CUDART_INF_F) continue;
    sum = __dadd_rn(sum, static_cast<double>(v));
    ++n;
  }
  if (n == 0) return 0.0;
  if (!p.adaptive) return 1.0 / p.tau;
  const double mean = sum / static_cast<double>(n);
  double var = 0.0;
  for (int64_t j = 0; j < K; ++j) {
    const float v = phi[j];
    if (v == -CUDART_INF_F) continue;
    const double d = __dsub_rn(static_cast<double>(v), mean);
    var = __dadd_rn(var, __dmul_rn(d, d));
  }
  const double sigma = sqrt(var / static_cast<double>(n));
  return fmax(sigma, p.sigma_min) / p.tau;
}

// Online logsumexp: exp(mx) * sum == sum_i exp(x_i) (as lse_add / lse_merge in apf_cpu.cpp).
__device__ __forceinline__ void lse_add(double x, double& mx, double& sum) {
  if (x <= mx) {
    sum = __dadd_rn(sum, exp(__dsub_rn(x, mx)));
  } else {
    sum = __dadd_rn(__dmul_rn(sum, exp(__dsub_rn(mx, x))), 1.0);
    mx = x;
  }
}
__device__ __forceinline__ void lse_merge(double mx2, double sum2, double& mx, double& sum) {
  if (sum2 == 0.0) return;
  if (mx2 <= mx) {
    sum = __dadd_rn(sum, __dmul_rn(sum2, exp(__dsub_rn(mx2, mx))));
  } else {
    sum = __dadd_rn(__dmul_rn(sum, exp(__dsub_rn(mx, mx2))), sum2);
    mx = mx2;
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    apf_scan_kernel(const float* __restrict__ phi, const int64_t* __restrict__ pids,
                    const float* __restrict__ queries, int64_t K, const T* __restrict__ emb,
                    int64_t D, const int64_t* __restrict__ offsets, int64_t U,
                    const int64_t* __restrict__ item_ids, ApfMask mask, ApfParams p,
                    Workspace ws, int64_t* __restrict__ bucket_ids,
                    float* __restrict__ bucket_sims) {
  __shared__ float cand_sim[kTileRows];  // this tile's survivors, unordered
  __shared__ int64_t cand_id[kTileRows];
  __shared__ float sort_sim[kTileRows];  // the same, best first
  __shared__ int64_t sort_id[kTileRows];
  __shared__ double red[kThreads];
  __shared__ double warp_mx[kWarps], warp_sum[kWarps];
  __shared__ double s_temp;
  __shared__ int n_cand;

  const int64_t pair = blockIdx.x;
  const int64_t b = pair / K;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t M = p.top_m;
  const int64_t base = pair * M;

  // Block-uniform: is there anything to search?
  const float score = phi[pair];
  const int64_t u = pids[pair];
  int64_t r0 = 0, r1 = 0;
  if (score != -CUDART_INF_F && u >= 0 && u < U) {
    r0 = offsets[u];
    r1 = offsets[u + 1];
  }
  if (r1 <= r0) {  // -inf beam, bad id (rejected by the caller) or empty bucket
    if (tid == 0) {
      ws.count[pair] = 0;
      ws.lse[pair] = -CUDART_INF;
    }
    for (int64_t i = tid; i < M; i += kThreads) {
      if (bucket_ids) bucket_ids[base + i] = -1;
      if (bucket_sims) bucket_sims[base + i] = -CUDART_INF_F;
    }
    return;
  }

  // Normalised query: sum of squares in fp64 over a fixed tree, then q / norm in fp64.
  const float* q = queries + pair * D;
  float* qn = ws.qn + pair * D;
  double ss = 0.0;
  for (int64_t t = tid; t < D; t += kThreads) {
    const double v = q[t];
    ss = __dadd_rn(ss, __dmul_rn(v, v));
  }
  red[tid] = ss;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) red[tid] = __dadd_rn(red[tid], red[tid + s]);
    __syncthreads();
  }
  const double norm = sqrt(red[0]);
  for (int64_t t = tid; t < D; t += kThreads)
    qn[t] = static_cast<float>(static_cast<double>(q[t]) / norm);
  if (tid == 0) s_temp = p.normalize_bucket ? request_temperature(phi + b * K, K, p) : 0.0;
  __syncthreads();  // qn (global) and s_temp are visible to the whole block from here on
  const double temp = s_temp;

  const uint8_t* allow = mask.data ? mask.data + b * mask.ld : nullptr;
  int64_t count = 0;  // entries in the list, identical in every thread
  int cur = 0;        // which buffer holds the list
  double lmx = -CUDART_INF, lsum = 0.0;  // this warp's online logsumexp (lane 0)
  for (int64_t t0 = r0; t0 < r1; t0 += kTileRows) {
    if (tid == 0) n_cand = 0;
    const bool full = count == M;
    float thr_s = 0.0f;
    int64_t thr_i = 0;
    if (full) {  // only rows better than the M-th best can enter
      thr_s = pick(ws.sim[0], ws.sim[1], cur)[base + M - 1];
      thr_i = pick(ws.id[0], ws.id[1], cur)[base + M - 1];
    }
    __syncthreads();
    const int64_t t1 = t0 + kTileRows < r1 ? t0 + kTileRows : r1;
    for (int64_t r = t0 + warp; r < t1; r += kWarps) {
      const int64_t id = item_ids[r];
      if (allow && (id < 0 || id >= mask.length || !allow[id])) continue;  // warp-uniform
      const T* row = emb + r * D;
      float acc = 0.0f;
      for (int64_t t = lane; t < D; t += 32) acc = __fmaf_rn(to_float(row[t]), qn[t], acc);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1)
        acc = __fadd_rn(acc, __shfl_xor_sync(kFullMask, acc, off));
      if (lane == 0) {
        if (p.normalize_bucket) lse_add(__dmul_rn(temp, static_cast<double>(acc)), lmx, lsum);
        if (!full || better(acc, id, thr_s, thr_i)) {
          const int slot = atomicAdd(&n_cand, 1);
          cand_sim[slot] = acc;
          cand_id[slot] = id;
        }
      }
    }
    __syncthreads();
    const int nc = n_cand;
    if (nc > 0) {
      if (tid < nc) {  // rank sort: the order is total, so ranks are a permutation
        const float s = cand_sim[tid];
        const int64_t i = cand_id[tid];
        int rank = 0;
        for (int j = 0; j < nc; ++j) rank += better(cand_sim[j], cand_id[j], s, i) ? 1 : 0;
        sort_sim[rank] = s;
        sort_id[rank] = i;
      }
      __syncthreads();
      const float* ls = pick(ws.sim[0], ws.sim[1], cur) + base;
      const int64_t* li = pick(ws.id[0], ws.id[1], cur) + base;
      float* os = pick(ws.sim[0], ws.sim[1], cur ^ 1) + base;
      int64_t* oi = pick(ws.id[0], ws.id[1], cur ^ 1) + base;
      if (tid < nc) {
        const int64_t pos = tid + count_better(ls, li, count, sort_sim[tid], sort_id[tid]);
        if (pos < M) {
          os[pos] = sort_sim[tid];
          oi[pos] = sort_id[tid];
        }
      }
      for (int64_t j = tid; j < count; j += kThreads) {
        const int64_t pos = j + count_better(sort_sim, sort_id, nc, ls[j], li[j]);
        if (pos < M) {
          os[pos] = ls[j];
          oi[pos] = li[j];
        }
      }
      count = count + nc < M ? count + nc : M;
      cur ^= 1;
    }
    __syncthreads();  // the merged list is visible; n_cand may be reset
  }

  if (lane == 0) {
    warp_mx[warp] = lmx;
    warp_sum[warp] = lsum;
  }
  __syncthreads();
  if (tid == 0) {
    ws.count[pair] = count;
    double mx = -CUDART_INF, sum = 0.0;
    for (int w = 0; w < kWarps; ++w) lse_merge(warp_mx[w], warp_sum[w], mx, sum);
    ws.lse[pair] = sum > 0.0 ? __dadd_rn(mx, log(sum)) : -CUDART_INF;
  }
  const float* fs = pick(ws.sim[0], ws.sim[1], cur) + base;
  const int64_t* fi = pick(ws.id[0], ws.id[1], cur) + base;
  for (int64_t i = tid; i < M; i += kThreads) {
    const bool kept = i < count;
    if (bucket_ids) bucket_ids[base + i] = kept ? fi[i] : -1;
    if (bucket_sims) bucket_sims[base + i] = kept ? fs[i] : -CUDART_INF_F;
    if (kept && cur == 1) {  // launch 2 reads buffer 0
      ws.sim[0][base + i] = fs[i];
      ws.id[0][base + i] = fi[i];
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    apf_fuse_kernel(const float* __restrict__ phi, const int64_t* __restrict__ pids, int64_t K,
                    ApfParams p, Workspace ws, int64_t* __restrict__ out_ids,
                    float* __restrict__ out_logp, int64_t* __restrict__ out_src) {
  __shared__ double red_lp[kThreads];
  __shared__ int64_t red_id[kThreads], red_k[kThreads];
  __shared__ double s_temp;

  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t M = p.top_m, N = p.top_n, KM = K * M;
  const int64_t pair0 = b * K;
  const float* ph = phi + pair0;
  if (tid == 0) s_temp = request_temperature(ph, K, p);
  __syncthreads();
  const double t = s_temp;

  // 1. Each beam's logsumexp and the log P of its candidates (one thread per beam).
  for (int64_t k = tid; k < K; k += kThreads) {
    const int64_t c = ws.count[pair0 + k];
    if (c == 0) continue;
    const float* s = ws.sim[0] + (pair0 + k) * M;
    double lse;
    if (p.normalize_bucket) {
      lse = ws.lse[pair0 + k];
    } else {
      const double mx = __dmul_rn(t, static_cast<double>(s[0]));  // the largest, as t >= 0
      double sum = 0.0;
      for (int64_t i = 0; i < c; ++i)
        sum = __dadd_rn(sum, exp(__dsub_rn(__dmul_rn(t, static_cast<double>(s[i])), mx)));
      lse = __dadd_rn(mx, log(sum));
    }
    const double score = ph[k];
    for (int64_t i = 0; i < c; ++i)
      ws.logp[(pair0 + k) * M + i] =
          __dsub_rn(__dadd_rn(score, __dmul_rn(t, static_cast<double>(s[i]))), lse);
  }
  __syncthreads();

  // 2. Which candidates compete for the top N.
  const int64_t* ids = ws.id[0] + pair0 * M;
  const double* logp = ws.logp + pair0 * M;
  uint8_t* live = ws.live + pair0 * M;
  for (int64_t j = tid; j < KM; j += kThreads) {
    const int64_t k = j / M, i = j % M;
    bool ok = i < ws.count[pair0 + k];
    if (ok && p.dedup) {
      // The same item in another beam on the same bucket with a better key wins.
      const int64_t id = ids[j], u = pids[pair0 + k];
      const double lp = logp[j];
      for (int64_t k2 = 0; k2 < K && ok; ++k2) {
        const int64_t c2 = ws.count[pair0 + k2];
        if (k2 == k || c2 == 0 || pids[pair0 + k2] != u) continue;
        for (int64_t i2 = 0; i2 < c2; ++i2) {
          if (ids[k2 * M + i2] != id) continue;
          const double lp2 = logp[k2 * M + i2];
          if (lp2 > lp || (lp2 == lp && k2 < k)) ok = false;
          break;
        }
      }
    }
    live[j] = ok ? 1 : 0;
  }
  __syncthreads();

  // 3. Global top N by repeated extraction.
  bool have_prev = false;
  double prev_lp = 0.0;
  int64_t prev_id = -1, prev_k = -1;
  for (int64_t r = 0; r < N; ++r) {
    double best_lp = 0.0;
    int64_t best_id = -1, best_k = -1;
    for (int64_t j = tid; j < KM; j += kThreads) {
      if (!live[j]) continue;
      const double lp = logp[j];
      const int64_t id = ids[j], k = j / M;
      if (have_prev && !result_better(prev_lp, prev_id, prev_k, lp, id, k)) continue;
      if (best_id < 0 || result_better(lp, id, k, best_lp, best_id, best_k)) {
        best_lp = lp;
        best_id = id;
        best_k = k;
      }
    }
    red_lp[tid] = best_lp;
    red_id[tid] = best_id;
    red_k[tid] = best_k;
    __syncthreads();
    for (int s = kThreads / 2; s > 0; s >>= 1) {
      if (tid < s && red_id[tid + s] >= 0 &&
          (red_id[tid] < 0 || result_better(red_lp[tid + s], red_id[tid + s], red_k[tid + s],
                                            red_lp[tid], red_id[tid], red_k[tid]))) {
        red_lp[tid] = red_lp[tid + s];
        red_id[tid] = red_id[tid + s];
        red_k[tid] = red_k[tid + s];
      }
      __syncthreads();
    }
    best_lp = red_lp[0];
    best_id = red_id[0];
    best_k = red_k[0];
    __syncthreads();  // everyone has read the winner before the next round overwrites it
    if (best_id < 0) {  // block-uniform: no candidate left, the rest is padding
      for (int64_t j = r + tid; j < N; j += kThreads) {
        out_ids[b * N + j] = -1;
        out_logp[b * N + j] = -CUDART_INF_F;
        out_src[b * N + j] = -1;
      }
      break;
    }
    if (tid == 0) {
      out_ids[b * N + r] = best_id;
      out_logp[b * N + r] = static_cast<float>(best_lp);
      out_src[b * N + r] = best_k;
    }
    have_prev = true;
    prev_lp = best_lp;
    prev_id = best_id;
    prev_k = best_k;
  }
}

// ------------------------------------------------------------------------------ host code

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("sigma_fast CUDA: ") + what + " failed: " +
                             cudaGetErrorString(status));
}

void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

int64_t align_up(int64_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

// Byte offsets of the workspace arrays from the aligned base.
struct Plan {
  int64_t sim[2] = {0, 0}, id[2] = {0, 0}, count = 0, lse = 0, qn = 0, logp = 0, live = 0;
  int64_t bytes = 0;  // including kAlign of slack for aligning the base pointer
};

void check_sizes(int64_t batch, int64_t k, int64_t dim, int64_t top_m) {
  const std::string got = "; got B=" + std::to_string(batch) + " K=" + std::to_string(k) +
                          " D=" + std::to_string(dim) + " M=" + std::to_string(top_m);
  require(batch >= 0 && k >= 0 && dim >= 1 && top_m >= 1,
          "apf_fuse (cuda): expected B >= 0, K >= 0, D >= 1, top_m >= 1" + got);
  require(batch <= INT_MAX && k <= INT_MAX && (k == 0 || batch <= INT_MAX / k),
          "apf_fuse (cuda): B * K must be < 2^31 (one block per beam)" + got);
  const int64_t pairs = batch * k;
  require(pairs == 0 || (top_m <= kMaxScratch / 64 / pairs && dim <= kMaxScratch / 8 / pairs),
          "apf_fuse (cuda): B * K * (top_m + D) is too large for the workspace" + got);
}

Plan make_plan(int64_t batch, int64_t k, int64_t dim, int64_t top_m) {
  check_sizes(batch, k, dim, top_m);
  Plan p;
  const int64_t pairs = batch * k;
  if (pairs == 0) return p;
  const int64_t entries = pairs * top_m;
  int64_t off = 0;
  auto take = [&off](int64_t bytes) {
    const int64_t at = off;
    off += align_up(bytes);
    return at;
  };
  for (int buf = 0; buf < 2; ++buf) {
    p.sim[buf] = take(4 * entries);
    p.id[buf] = take(8 * entries);
  }
  p.count = take(8 * pairs);
  p.lse = take(8 * pairs);
  p.qn = take(4 * pairs * dim);
  p.logp = take(8 * entries);
  p.live = take(entries);
  p.bytes = off + kAlign;
  return p;
}

template <class T>
void launch_scan(const float* phi, const int64_t* pids, const float* queries, int64_t batch,
                 int64_t k, const ApfIndex& index, const ApfMask& mask,
                 const ApfParams& params, const Workspace& ws, int64_t* bucket_ids,
                 float* bucket_sims, cudaStream_t stream) {
  apf_scan_kernel<T><<<static_cast<unsigned>(batch * k), kThreads, 0, stream>>>(
      phi, pids, queries, k, static_cast<const T*>(index.embeddings), index.dim, index.offsets,
      index.num_buckets, index.item_ids, mask, params, ws, bucket_ids, bucket_sims);
  check_launch("apf_scan_kernel launch");
}

}  // namespace

int64_t apf_fuse_cuda_workspace_bytes(int64_t batch, int64_t k, int64_t dim, int64_t top_m) {
  return make_plan(batch, k, dim, top_m).bytes;
}

void apf_fuse_cuda(const float* prefix_scores, const int64_t* prefix_ids, const float* queries,
                   int64_t batch, int64_t k, const ApfIndex& index, const ApfMask& allowed,
                   const ApfParams& params, int64_t* out_ids, float* out_logp,
                   int64_t* out_src, int64_t* bucket_ids, float* bucket_sims, void* workspace,
                   int64_t workspace_bytes, cudaStream_t stream) {
  check_apf_args(batch, k, index, allowed, params);
  const Plan plan = make_plan(batch, k, index.dim, params.top_m);
  require(workspace_bytes >= plan.bytes,
          "apf_fuse (cuda): workspace of " + std::to_string(workspace_bytes) +
              " bytes is smaller than the " + std::to_string(plan.bytes) + " bytes needed");
  if (batch == 0) return;
  require(out_ids && out_logp && out_src, "apf_fuse (cuda): output pointers must be non-null");
  require(k == 0 || (prefix_scores && prefix_ids && queries && index.embeddings &&
                     index.offsets && index.item_ids && workspace),
          "apf_fuse (cuda): input and workspace pointers must be non-null");

  Workspace ws{};
  if (k > 0) {
    const auto raw = reinterpret_cast<uintptr_t>(workspace);
    char* base = reinterpret_cast<char*>((raw + kAlign - 1) / kAlign * kAlign);
    for (int buf = 0; buf < 2; ++buf) {
      ws.sim[buf] = reinterpret_cast<float*>(base + plan.sim[buf]);
      ws.id[buf] = reinterpret_cast<int64_t*>(base + plan.id[buf]);
    }
    ws.count = reinterpret_cast<int64_t*>(base + plan.count);
    ws.lse = reinterpret_cast<double*>(base + plan.lse);
    ws.qn = reinterpret_cast<float*>(base + plan.qn);
    ws.logp = reinterpret_cast<double*>(base + plan.logp);
    ws.live = reinterpret_cast<uint8_t*>(base + plan.live);
    switch (index.emb_type) {
      case ApfEmbType::kFloat32:
        launch_scan<float>(prefix_scores, prefix_ids, queries, batch, k, index, allowed, params,
                           ws, bucket_ids, bucket_sims, stream);
        break;
      case ApfEmbType::kFloat16:
        launch_scan<__half>(prefix_scores, prefix_ids, queries, batch, k, index, allowed,
                            params, ws, bucket_ids, bucket_sims, stream);
        break;
      case ApfEmbType::kBFloat16:
        launch_scan<__nv_bfloat16>(prefix_scores, prefix_ids, queries, batch, k, index,
                                   allowed, params, ws, bucket_ids, bucket_sims, stream);
        break;
      default:
        throw std::invalid_argument("apf_fuse (cuda): unknown embedding type " +
                                    std::to_string(static_cast<int>(index.emb_type)));
    }
  }
  apf_fuse_kernel<<<static_cast<unsigned>(batch), kThreads, 0, stream>>>(
      prefix_scores, prefix_ids, k, params, ws, out_ids, out_logp, out_src);
  check_launch("apf_fuse_kernel launch");
}

}  // namespace sigma_fast
