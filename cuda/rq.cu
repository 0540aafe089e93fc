// Residual quantization on CUDA (torch-free). Semantics: python/sigma_fast/reference/rq.py;
// the structure, score formula and tie rules mirror the CPU twin (csrc/rq_cpu.cpp).
//
// Encode works on chunks of m vectors (see rq_encode_cuda_workspace_bytes), level by level:
//   * Dot products <r, c_j> come from one shared-memory-tiled fp32 kernel (dot_tile): every
//     product is a single __fmaf_rn chain over t = 0..d-1 in order, the same sequence the CPU
//     twin's AVX2 kernel runs, so scores agree with it bit for bit. No TF32, no tensor cores.
//   * Greedy: one kernel per level fuses the dot products with the row argmin and then updates
//     the block's own residual rows in place (no other block touches them).
//   * Beam: per level, (1) scores[row, j] = ||r||^2 + ||c_j||^2 - 2<r, c_j> into scratch,
//     (2) one block per vector picks the best nb_next candidates in order, (3) one warp per
//     kept beam writes its residual, norm and code prefix into the other half of a double
//     buffer.
// Every reduction has a fixed shape and order and nothing uses atomics, so results are
// deterministic run to run.
#include "rq_cuda.h"

#include <cuda_runtime.h>
#include <math_constants.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.h"

namespace sigma_fast {
namespace {

constexpr int kThreads = 256;  // threads per block in every kernel
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;      // rows and codewords per dot-product tile (16 x 16 threads, 4 x 4 each)
constexpr int kTk = 16;        // depth of one shared-memory slice of the tile
constexpr int64_t kAlign = 256;          // alignment of every workspace array
constexpr int64_t kMaxGrid = 1 << 20;    // cap for grid-stride kernels
constexpr int64_t kMaxScratch = int64_t{1} << 40;  // refuse plans beyond 1 TiB of scratch
constexpr int kNoCode = INT_MAX;
constexpr int64_t kNoKey = INT64_MAX;
constexpr unsigned kFullMask = 0xffffffffu;

// ------------------------------------------------------------------------------ device code

// Candidate distance with NaN mapped to +inf (so orderings stay strict-weak); the same
// expression, evaluated in the same order, as candidate_score in csrc/rq_cpu.cpp. The explicit
// _rn intrinsics keep nvcc from contracting it into a differently rounded FMA.
__device__ __forceinline__ float candidate_score(float rnorm, float cnorm, float dot) {
  const float s = __fsub_rn(__fadd_rn(rnorm, cnorm), __fmul_rn(2.0f, dot));
  return s == s ? s : CUDART_INF_F;
}

// Lexicographic (score, key) order used by the beam selection.
__device__ __forceinline__ bool before(float s1, int64_t k1, float s2, int64_t k2) {
  return s1 < s2 || (s1 == s2 && k1 < k2);
}

// Sum over the warp in a fixed butterfly order (deterministic; every lane gets the result).
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

struct TileSmem {
  float a[kTk][kTile + 4];  // a[t][row]: residual slice, transposed
  float b[kTk][kTile + 4];  // b[t][col]: codeword slice, transposed
};

// acc[i][j] = <a[row0 + ty + 16 i], cb[col0 + tx + 16 j]> for the calling thread
// (tx = tid % 16, ty = tid / 16). Rows >= rows and codewords >= k read as zero; the caller
// ignores them. Must be called by all kThreads threads of the block (it synchronizes).
__device__ __forceinline__ void dot_tile(const float* a, int64_t rows, int64_t lda,
                                         const float* cb, int64_t k, int64_t d, int64_t row0,
                                         int64_t col0, TileSmem& sm, float (&acc)[4][4]) {
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  for (int64_t t0 = 0; t0 < d; t0 += kTk) {
    // Loads: thread (tx, ty) fetches element t0 + tx of rows/codewords ty + 16 q (16
    // consecutive floats per row, so each half-warp reads one 64-byte segment).
    const int64_t t = t0 + tx;
    const bool t_ok = t < d;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t r = row0 + ty + 16 * q;
      sm.a[tx][ty + 16 * q] = (t_ok && r < rows) ? a[r * lda + t] : 0.0f;
      const int64_t c = col0 + ty + 16 * q;
      sm.b[tx][ty + 16 * q] = (t_ok && c < k) ? cb[c * d + t] : 0.0f;
    }
    __syncthreads();
    // Zero padding past d only appends fma(0, 0, acc) == acc to each chain.
#pragma unroll
    for (int tt = 0; tt < kTk; ++tt) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = sm.a[tt][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = sm.b[tt][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = __fmaf_rn(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
}

// out[r] = ||a[r]||^2 for r < rows: one warp per row, products and sum in double.
__global__ void __launch_bounds__(kThreads)
    rq_sqnorm_kernel(const float* __restrict__ a, int64_t rows, int64_t lda, int64_t d,
                     float* __restrict__ out) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + warp; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kWarps) {
    const float* v = a + r * lda;
    double s = 0.0;
    for (int64_t t = lane; t < d; t += 32) s += static_cast<double>(v[t]) * v[t];
    s = warp_sum(s);
    if (lane == 0) out[r] = static_cast<float>(s);
  }
}

// One greedy level for kTile rows per block: code = argmin_j ||c_j||^2 - 2<r, c_j> (ties: the
// smaller j; all scores +inf: code 0, as on the CPU), then res[r] = src[r] - c_code. src may be
// res itself (in-place update: the block reads its rows only in dot_tile, which has finished).
// err (nullable, last level only) gets ||res[r]||^2.
__global__ void __launch_bounds__(kThreads, 2)
    rq_greedy_level_kernel(const float* src, int64_t lds, float* res, int64_t rows,
                           const float* __restrict__ cb, int64_t k, int64_t d,
                           const float* __restrict__ cnorm, int64_t* __restrict__ codes,
                           int64_t levels, int64_t level, float* __restrict__ err) {
  __shared__ TileSmem sm;
  __shared__ int chosen[kTile];
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;

  float best_s[4];
  int best_j[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    best_s[i] = CUDART_INF_F;
    best_j[i] = kNoCode;
  }
  float acc[4][4];
  for (int64_t col0 = 0; col0 < k; col0 += kTile) {
    dot_tile(src, rows, lds, cb, k, d, row0, col0, sm, acc);
    // Each thread sees its codewords in increasing j; strict '<' keeps the smaller j on ties.
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = col0 + tx + 16 * j;
      if (c >= k) break;
      const float cn = cnorm[c];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float s = candidate_score(0.0f, cn, acc[i][j]);
        if (s < best_s[i]) {
          best_s[i] = s;
          best_j[i] = static_cast<int>(c);
        }
      }
    }
  }
  // The 16 threads sharing a row are lanes [0, 16) or [16, 32) of one warp.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) {
      const float os = __shfl_xor_sync(kFullMask, best_s[i], off);
      const int oj = __shfl_xor_sync(kFullMask, best_j[i], off);
      if (os < best_s[i] || (os == best_s[i] && oj < best_j[i])) {
        best_s[i] = os;
        best_j[i] = oj;
      }
    }
  }
  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int local = ty + 16 * i;
      const int code = best_j[i] == kNoCode ? 0 : best_j[i];
      chosen[local] = code;
      const int64_t r = row0 + local;
      if (r < rows) codes[r * levels + level] = code;
    }
  }
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int local = warp; local < kTile; local += kWarps) {
    const int64_t r = row0 + local;
    if (r >= rows) break;  // uniform across the warp
    const float* s = src + r * lds;
    const float* c = cb + static_cast<int64_t>(chosen[local]) * d;
    float* o = res + r * d;
    double sq = 0.0;
    for (int64_t t = lane; t < d; t += 32) {
      const float v = __fsub_rn(s[t], c[t]);
      o[t] = v;
      sq += static_cast<double>(v) * v;
    }
    if (err != nullptr) {
      sq = warp_sum(sq);
      if (lane == 0) err[r] = static_cast<float>(sq);
    }
  }
}

// scores[r * k + j] = candidate_score(rnorm[r], cnorm[j], <a[r], cb[j]>) for r < rows, j < k.
// Grid: x over row tiles, y over codeword tiles (strided when k needs more than gridDim.y).
__global__ void __launch_bounds__(kThreads, 2)
    rq_scores_kernel(const float* __restrict__ a, int64_t rows, int64_t lda,
                     const float* __restrict__ cb, int64_t k, int64_t d,
                     const float* __restrict__ cnorm, const float* __restrict__ rnorm,
                     float* __restrict__ scores) {
  __shared__ TileSmem sm;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  float acc[4][4];
  for (int64_t col0 = static_cast<int64_t>(blockIdx.y) * kTile; col0 < k;
       col0 += static_cast<int64_t>(gridDim.y) * kTile) {
    dot_tile(a, rows, lda, cb, k, d, row0, col0, sm, acc);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t r = row0 + ty + 16 * i;
      if (r >= rows) break;
      const float rn = rnorm[r];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t c = col0 + tx + 16 * j;
        if (c >= k) break;
        scores[r * k + c] = candidate_score(rn, cnorm[c], acc[i][j]);
      }
    }
  }
}

// One block per vector i. Its candidates are c = b * k + j (live beam b < nb, code j < k) with
// score scores[(i * nb + b) * k + j]. The order is (score, key) with key = prank[b] * k + j,
// where prank[b] is the rank of beam b's code prefix among the vector's live prefixes in
// lexicographic order (all prefixes have the same length and are distinct), so equal scores
// go to the lexicographically smaller code tuple, exactly as in the CPU twin. Keys are unique,
// so the order is total.
//
// Selection: nb_next rounds of a block-wide min. Each thread keeps the best of its own
// candidates that come after everything selected so far; only the round's winner has to
// rescan, since every other thread's best is still after the new last-selected candidate.
// Outputs for kept beam c (best first): its parent beam, code and key, and the rank of its
// prefix among the kept prefixes (for the next level's tie rule).
__global__ void __launch_bounds__(kThreads)
    rq_select_kernel(const float* __restrict__ scores, int64_t nb, int64_t k, int64_t nb_next,
                     const int* __restrict__ prank, int* __restrict__ sel_parent,
                     int* __restrict__ sel_code, int64_t* sel_key,
                     int* __restrict__ prank_next) {
  __shared__ float red_s[kWarps];
  __shared__ int64_t red_k[kWarps];
  __shared__ int64_t win_k;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t i = blockIdx.x;
  const float* s = scores + i * nb * k;
  const int* pr = prank != nullptr ? prank + i * nb : nullptr;  // null: one live beam
  const int64_t cands = nb * k;
  // This thread's candidates are c = tid + q * kThreads, walked as (b, j) without divisions.
  const int64_t step_b = kThreads / k, step_j = kThreads % k;
  const int64_t b_first = tid / k, j_first = tid % k;

  float my_s = CUDART_INF_F;
  int64_t my_k = kNoKey;
  int my_b = 0, my_j = 0;
  // Best own candidate strictly after (after_s, after_k).
  auto scan = [&](float after_s, int64_t after_k) {
    my_s = CUDART_INF_F;
    my_k = kNoKey;
    int64_t b = b_first, j = j_first;
    for (int64_t c = tid; c < cands; c += kThreads) {
      const float sc = s[c];
      const int64_t key = (pr != nullptr ? static_cast<int64_t>(pr[b]) : 0) * k + j;
      if (before(after_s, after_k, sc, key) && before(sc, key, my_s, my_k)) {
        my_s = sc;
        my_k = key;
        my_b = static_cast<int>(b);
        my_j = static_cast<int>(j);
      }
      j += step_j;
      b += step_b;
      if (j >= k) {
        j -= k;
        ++b;
      }
    }
  };
  scan(-CUDART_INF_F, -1);

  for (int64_t c = 0; c < nb_next; ++c) {
    float bs = my_s;
    int64_t bk = my_k;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float os = __shfl_xor_sync(kFullMask, bs, off);
      const int64_t ok = __shfl_xor_sync(kFullMask, bk, off);
      if (before(os, ok, bs, bk)) {
        bs = os;
        bk = ok;
      }
    }
    if (lane == 0) {
      red_s[warp] = bs;
      red_k[warp] = bk;
    }
    __syncthreads();
    if (warp == 0) {
      bs = lane < kWarps ? red_s[lane] : CUDART_INF_F;
      bk = lane < kWarps ? red_k[lane] : kNoKey;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        const float os = __shfl_xor_sync(kFullMask, bs, off);
        const int64_t ok = __shfl_xor_sync(kFullMask, bk, off);
        if (before(os, ok, bs, bk)) {
          bs = os;
          bk = ok;
        }
      }
      if (lane == 0) win_k = bk;  // keys are unique: the key alone names the winner
    }
    __syncthreads();
    // c < nb_next <= cands, so an unselected candidate remains and the winner is real; keys
    // are unique, so exactly one thread owns it.
    if (my_k == win_k) {
      const int64_t o = i * nb_next + c;
      sel_parent[o] = my_b;
      sel_code[o] = my_j;
      sel_key[o] = my_k;
      scan(my_s, my_k);
    }
    // The next round writes red_* only after every thread has passed this round's second
    // barrier and win_k only after its first, so no third barrier is needed here.
  }
  __syncthreads();  // makes the owners' sel_key writes visible to the whole block
  // Kept prefixes are (parent prefix, j), ordered by (prank[parent], j) = key.
  const int64_t* keys = sel_key + i * nb_next;
  for (int64_t c = tid; c < nb_next; c += kThreads) {
    const int64_t key = keys[c];
    int rank = 0;
    for (int64_t c2 = 0; c2 < nb_next; ++c2) rank += keys[c2] < key ? 1 : 0;
    prank_next[i * nb_next + c] = rank;
  }
}

// One warp per kept beam row = i * nb_next + c: its residual src[i * nb + parent] - cb[code],
// that residual's squared norm (double), and its code prefix (parent's, then code).
__global__ void __launch_bounds__(kThreads)
    rq_beam_update_kernel(const float* __restrict__ src, int64_t lds, int64_t nb,
                          int64_t rows_next, int64_t nb_next, const float* __restrict__ cb,
                          int64_t d, const int* __restrict__ sel_parent,
                          const int* __restrict__ sel_code, const int* __restrict__ prefix,
                          int* __restrict__ prefix_next, int64_t levels, int64_t level,
                          float* __restrict__ res_next, float* __restrict__ rnorm_next) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < rows_next;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t i = row / nb_next;
    const int64_t parent = i * nb + sel_parent[row];
    const int code = sel_code[row];
    const float* s = src + parent * lds;
    const float* c = cb + static_cast<int64_t>(code) * d;
    float* o = res_next + row * d;
    double sq = 0.0;
    for (int64_t t = lane; t < d; t += 32) {
      const float v = __fsub_rn(s[t], c[t]);
      o[t] = v;
      sq += static_cast<double>(v) * v;
    }
    for (int64_t t = lane; t < level; t += 32)
      prefix_next[row * levels + t] = prefix[parent * levels + t];
    if (lane == 0) prefix_next[row * levels + level] = code;
    sq = warp_sum(sq);
    if (lane == 0) rnorm_next[row] = static_cast<float>(sq);
  }
}

// Beams are kept best first, so beam 0 of each vector is the answer.
__global__ void __launch_bounds__(kThreads)
    rq_beam_finish_kernel(const int* __restrict__ prefix, const float* __restrict__ rnorm,
                          int64_t m, int64_t nb, int64_t levels, int64_t* __restrict__ codes,
                          float* __restrict__ err) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
       idx < m * levels; idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = idx / levels, l = idx - i * levels;
    codes[idx] = prefix[i * nb * levels + l];
    if (l == 0 && err != nullptr) err[i] = rnorm[i * nb];
  }
}

template <class CodeT>
__global__ void __launch_bounds__(kThreads)
    rq_decode_kernel(const CodeT* __restrict__ codes, int64_t n, int64_t ldc, int64_t levels,
                     const float* __restrict__ cb, int64_t k, int64_t d,
                     float* __restrict__ out) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < n * d;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = idx / d, t = idx - i * d;
    float acc = 0.0f;
    for (int64_t l = 0; l < levels; ++l) {
      const int64_t c = static_cast<int64_t>(codes[i * ldc + l]);
      if (c < 0 || c >= k) continue;  // validated by the caller; never read out of bounds
      acc = __fadd_rn(acc, cb[(l * k + c) * d + t]);
    }
    out[idx] = acc;
  }
}

// ------------------------------------------------------------------------------ host code

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("sigma_fast CUDA: ") + what + " failed: " +
                             cudaGetErrorString(status));
}

void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t align_up(int64_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

unsigned grid_stride_blocks(int64_t items, int64_t per_block) {
  return static_cast<unsigned>(std::min(ceil_div(items, per_block), kMaxGrid));
}

unsigned tile_blocks(int64_t rows) {
  const int64_t blocks = ceil_div(rows, kTile);
  if (blocks > INT_MAX) throw std::runtime_error("sigma_fast CUDA: too many row tiles");
  return static_cast<unsigned>(blocks);
}

// Where each array lives in the workspace (byte offsets from the aligned base) for chunks of
// m vectors with up to bmax live beams each.
struct EncodePlan {
  int64_t m = 0, bmax = 1;
  int64_t cnorm = 0, res[2] = {0, 0}, rnorm[2] = {0, 0}, prank[2] = {0, 0};
  int64_t prefix[2] = {0, 0}, scores = 0, sel_parent = 0, sel_code = 0, sel_key = 0;
  int64_t bytes = 0;  // including kAlign of slack for aligning the base pointer
};

constexpr int kPlanArrays = 13;  // cnorm + 12 per-chunk arrays (greedy uses 2 of them)

void check_encode_sizes(int64_t n, int64_t d, int64_t levels, int64_t k, int64_t beam_width) {
  check_rq_encode_sizes(n, d, levels, k, beam_width);
  require(k <= INT_MAX && d <= INT_MAX && levels <= INT_MAX,
          "rq_encode (cuda): k, d and levels must each be < 2^31; got d=" + std::to_string(d) +
              " levels=" + std::to_string(levels) + " k=" + std::to_string(k));
}

EncodePlan make_plan(int64_t n, int64_t d, int64_t levels, int64_t k, int64_t beam_width) {
  check_encode_sizes(n, d, levels, k, beam_width);
  EncodePlan p;
  if (n == 0) return p;
  // Most live beams at any level: min(beam_width, k^levels), without overflow.
  int64_t bmax = 1;
  for (int64_t l = 0; l < levels && bmax < beam_width; ++l)
    bmax = bmax > beam_width / k ? beam_width : std::min(beam_width, bmax * k);
  p.bmax = bmax;
  const bool greedy = beam_width == 1;
  const int64_t row_bytes = 8 * d + 4 * k + 8 * levels + 32;  // per live beam, see below
  require(greedy || (bmax <= INT_MAX / 2 && bmax <= kMaxScratch / row_bytes),
          "rq_encode (cuda): beam_width " + std::to_string(beam_width) +
              " is too large: one vector's beam search would need min(beam_width, k^levels) = " +
              std::to_string(bmax) + " beams of " + std::to_string(row_bytes) + " bytes");
  const int64_t per_vector = greedy ? 4 * d : bmax * row_bytes;
  const int64_t fixed = align_up(4 * levels * k) + kAlign * (kPlanArrays + 1);
  const int64_t fit = (kRqWorkspaceBudget - fixed) / per_vector;
  p.m = std::max<int64_t>(1, std::min(n, fit));

  int64_t off = 0;
  auto take = [&](int64_t bytes) {
    const int64_t at = off;
    off += align_up(bytes);
    return at;
  };
  const int64_t rows = p.m * bmax;  // live beam rows of a chunk
  p.cnorm = take(4 * levels * k);
  p.res[0] = take(4 * rows * d);
  if (!greedy) {
    p.res[1] = take(4 * rows * d);
    p.rnorm[0] = take(4 * rows);
    p.rnorm[1] = take(4 * rows);
    p.prank[0] = take(4 * rows);
    p.prank[1] = take(4 * rows);
    p.prefix[0] = take(4 * rows * levels);
    p.prefix[1] = take(4 * rows * levels);
    p.scores = take(4 * rows * k);
    p.sel_parent = take(4 * rows);
    p.sel_code = take(4 * rows);
    p.sel_key = take(8 * rows);
  }
  p.bytes = off + kAlign;
  return p;
}

void encode_greedy_chunk(const float* x, int64_t m, int64_t d, int64_t ldx,
                         const float* codebooks, int64_t levels, int64_t k, const float* cnorm,
                         float* res, int64_t* codes, float* err, cudaStream_t stream) {
  for (int64_t l = 0; l < levels; ++l) {
    const float* src = l == 0 ? x : res;
    const int64_t lds = l == 0 ? ldx : d;
    rq_greedy_level_kernel<<<tile_blocks(m), kThreads, 0, stream>>>(
        src, lds, res, m, codebooks + l * k * d, k, d, cnorm + l * k, codes, levels, l,
        l == levels - 1 ? err : nullptr);
    check_launch("rq_greedy_level_kernel launch");
  }
}

void encode_beam_chunk(const float* x, int64_t m, int64_t d, int64_t ldx,
                       const float* codebooks, int64_t levels, int64_t k, int64_t beam_width,
                       const float* cnorm, char* base, const EncodePlan& p, int64_t* codes,
                       float* err, cudaStream_t stream) {
  float* res[2] = {reinterpret_cast<float*>(base + p.res[0]),
                   reinterpret_cast<float*>(base + p.res[1])};
  float* rnorm[2] = {reinterpret_cast<float*>(base + p.rnorm[0]),
                     reinterpret_cast<float*>(base + p.rnorm[1])};
  int* prank[2] = {reinterpret_cast<int*>(base + p.prank[0]),
                   reinterpret_cast<int*>(base + p.prank[1])};
  int* prefix[2] = {reinterpret_cast<int*>(base + p.prefix[0]),
                    reinterpret_cast<int*>(base + p.prefix[1])};
  float* scores = reinterpret_cast<float*>(base + p.scores);
  int* sel_parent = reinterpret_cast<int*>(base + p.sel_parent);
  int* sel_code = reinterpret_cast<int*>(base + p.sel_code);
  int64_t* sel_key = reinterpret_cast<int64_t*>(base + p.sel_key);

  // Level l reads half `in` (x for l == 0) and writes half `out`; level 0's input norms go
  // to half 1.
  rq_sqnorm_kernel<<<grid_stride_blocks(m, kWarps), kThreads, 0, stream>>>(x, m, ldx, d,
                                                                           rnorm[1]);
  check_launch("rq_sqnorm_kernel launch");
  int64_t nb = 1;  // live beams per vector (the same for every vector)
  for (int64_t l = 0; l < levels; ++l) {
    const int in = static_cast<int>((l + 1) & 1), out = static_cast<int>(l & 1);
    const float* a = l == 0 ? x : res[in];
    const int64_t lda = l == 0 ? ldx : d;
    const float* cb = codebooks + l * k * d;
    const int64_t rows = m * nb;
    const dim3 grid(tile_blocks(rows),
                    static_cast<unsigned>(std::min<int64_t>(ceil_div(k, kTile), 65535)));
    rq_scores_kernel<<<grid, kThreads, 0, stream>>>(a, rows, lda, cb, k, d, cnorm + l * k,
                                                    rnorm[in], scores);
    check_launch("rq_scores_kernel launch");

    const int64_t nb_next = std::min(beam_width, nb * k);
    rq_select_kernel<<<static_cast<unsigned>(m), kThreads, 0, stream>>>(
        scores, nb, k, nb_next, l == 0 ? nullptr : prank[in], sel_parent, sel_code, sel_key,
        prank[out]);
    check_launch("rq_select_kernel launch");

    const int64_t rows_next = m * nb_next;
    rq_beam_update_kernel<<<grid_stride_blocks(rows_next, kWarps), kThreads, 0, stream>>>(
        a, lda, nb, rows_next, nb_next, cb, d, sel_parent, sel_code,
        l == 0 ? nullptr : prefix[in], prefix[out], levels, l, res[out], rnorm[out]);
    check_launch("rq_beam_update_kernel launch");
    nb = nb_next;
  }
  const int last = static_cast<int>((levels - 1) & 1);
  rq_beam_finish_kernel<<<grid_stride_blocks(m * levels, kThreads), kThreads, 0, stream>>>(
      prefix[last], rnorm[last], m, nb, levels, codes, err);
  check_launch("rq_beam_finish_kernel launch");
}

}  // namespace

int64_t rq_encode_cuda_workspace_bytes(int64_t n, int64_t d, int64_t levels, int64_t k,
                                       int64_t beam_width) {
  return make_plan(n, d, levels, k, beam_width).bytes;
}

void rq_encode_cuda(const float* x, int64_t n, int64_t d, int64_t ldx, const float* codebooks,
                    int64_t levels, int64_t k, int64_t beam_width, int64_t* codes, float* err,
                    void* workspace, int64_t workspace_bytes, cudaStream_t stream) {
  const EncodePlan p = make_plan(n, d, levels, k, beam_width);
  check_rq_encode_stride(ldx, d);
  if (n == 0) return;
  require(x != nullptr && codebooks != nullptr && codes != nullptr,
          "rq_encode (cuda): x, codebooks and codes must be non-null device pointers");
  require(workspace != nullptr && workspace_bytes >= p.bytes,
          "rq_encode (cuda): workspace must hold at least " + std::to_string(p.bytes) +
              " bytes (rq_encode_workspace_bytes); got " + std::to_string(workspace_bytes) +
              (workspace == nullptr ? " at a null pointer" : ""));

  const auto addr = reinterpret_cast<uintptr_t>(workspace);
  char* base = reinterpret_cast<char*>((addr + kAlign - 1) / kAlign * kAlign);
  float* cnorm = reinterpret_cast<float*>(base + p.cnorm);
  rq_sqnorm_kernel<<<grid_stride_blocks(levels * k, kWarps), kThreads, 0, stream>>>(
      codebooks, levels * k, d, d, cnorm);
  check_launch("rq_sqnorm_kernel launch");

  for (int64_t v0 = 0; v0 < n; v0 += p.m) {
    const int64_t m = std::min(p.m, n - v0);
    const float* xs = x + v0 * ldx;
    int64_t* cs = codes + v0 * levels;
    float* es = err != nullptr ? err + v0 : nullptr;
    if (beam_width == 1) {
      encode_greedy_chunk(xs, m, d, ldx, codebooks, levels, k, cnorm,
                          reinterpret_cast<float*>(base + p.res[0]), cs, es, stream);
    } else {
      encode_beam_chunk(xs, m, d, ldx, codebooks, levels, k, beam_width, cnorm, base, p, cs,
                        es, stream);
    }
  }
}

template <class CodeT>
void rq_decode_cuda(const CodeT* codes, int64_t n, int64_t ldc, int64_t levels,
                    const float* codebooks, int64_t k, int64_t d, float* out,
                    cudaStream_t stream) {
  check_rq_decode_sizes(n, d, levels, k, ldc);
  if (n == 0) return;
  require(out != nullptr && codebooks != nullptr && (levels == 0 || codes != nullptr),
          "rq_decode (cuda): codes, codebooks and out must be non-null device pointers");
  rq_decode_kernel<CodeT><<<grid_stride_blocks(n * d, kThreads), kThreads, 0, stream>>>(
      codes, n, ldc, levels, codebooks, k, d, out);
  check_launch("rq_decode_kernel launch");
}

template void rq_decode_cuda<int32_t>(const int32_t*, int64_t, int64_t, int64_t, const float*,
                                      int64_t, int64_t, float*, cudaStream_t);
template void rq_decode_cuda<int64_t>(const int64_t*, int64_t, int64_t, int64_t, const float*,
                                      int64_t, int64_t, float*, cudaStream_t);

}  // namespace sigma_fast
