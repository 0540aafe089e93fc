// One step of trie-constrained beam search on CUDA (torch-free). Semantics:
// python/sigma_fast/reference/beam.py; precision choices follow the CPU twin
// (csrc/beam_step_cpu.cpp): float32 max + sum of exp(x - max), lse = max + log(sum), then
// score = beam_score + (logit - lse) in float32 (beam_score + logit for normalize "none", which
// therefore agrees bitwise with every other backend).
//
// One kernel per step, or two in a "split" step, which gives a request with many candidates
// more than one block: S blocks per request each take a contiguous range of its input beams
// through 1-5 below and keep their own top W (a request's top W is always inside the union of
// its ranges' top W); a second, small kernel merges the S lists of each request and places,
// advances and pads.
// S (1 or 2) comes from the batch size and the candidate bound beams_in * k (choose_splits);
// SIGMA_FAST_BEAM_SPLITS=s forces it (1 = always one kernel, up to 8), for tuning and tests.
// Per block:
//   1. one warp per input beam: check the beam score, the state, the logits row (NaN / +inf)
//      and the node's CSR range; compute the beam's log-sum-exp (full row, valid children, or
//      none). The first failing beam (in beam order) is recorded with an atomicMin on
//      (beam << 8 | code), so the reported error does not depend on scheduling.
//   2. exclusive prefix of the live beams' child counts: candidate c of the request is slot
//      lo[w] + (c - start[w]) of beam w, so candidate order is (parent, token) order (tokens
//      ascend within a node).
//   3. score every candidate once into the workspace (-inf when the child is not allowed), and
//      histogram the top byte of its order key.
//   4. exact radix select of the W-th best score (4 passes of 8 bits over the key "score
//      descending"), then one ordered pass keeps every candidate above it and the first
//      (in candidate order) of those equal to it: exactly the tie rule. A block with at most
//      192 candidates (SIGMA_FAST_BEAM_RANK_MAX, 0..1024) keeps their scores in shared memory
//      instead and ranks each directly (the candidates above it + the equal ones before it).
//   5. the kept candidates (<= W) are placed by rank (number of kept candidates that rank
//      before each), advanced to their child node, and the rest padded (-inf, -1, -1, -1);
//      in a split step the block instead writes them in rank order, keyed by (beam, child
//      slot), with its first error, for the merge kernel, which ranks the union the same way.
// Reductions have fixed shapes and orders; the only atomics are integer (histogram, min), so
// results are deterministic run to run.
#include "beam_step_cuda.h"

#include <cuda_runtime.h>
#include <math_constants.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace sigma_fast {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kAlign = 256;
constexpr unsigned long long kNoError = ~0ull;
// Split steps: at most kMaxSplits blocks per request, and at most kMergeCap candidates (S * W)
// for the merge kernel's shared memory.
constexpr int kMaxSplits = 8;
constexpr int kMergeCap = 2048;
constexpr int kMergeThreads = 256;
// Requests (or split blocks) with at most rank_max candidates (default kRankDefault, at most
// kRankCap) skip the radix select: their scores go to shared memory and every candidate counts
// the ones that rank before it, a loop over all of them per thread, so it pays only for small
// blocks: with K = 256 it beat the radix passes for the deep steps (up to ~190 candidates per
// block) and lost to them for a root step (256 candidates). Hence 192 (the sweep of cut-offs
// is in bench/RESULTS.md).
constexpr int kRankCap = 1024;
constexpr int kRankDefault = 192;

// Byte offsets of the workspace arrays (from the 256-byte aligned base); each holds `batch`
// per-request slices.
struct Layout {
  int64_t lo = 0, cnt = 0, start = 0, bs = 0, lse = 0, cand = 0, sel_score = 0, sel_idx = 0;
  // Split steps, per block: its kept candidates in rank order (score, (beam << 32) | child
  // slot), their count and the block's first error.
  int64_t part_score = 0, part_key = 0, part_count = 0, part_err = 0;
  int64_t bytes = 0;  // total, base alignment included
};

int64_t align_up(int64_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

void check_sizes(int64_t batch, int64_t beams_in, int64_t k, int64_t beam_width) {
  if (batch < 0 || beams_in < 0)
    throw std::invalid_argument("constrained_beam_step_cuda: negative batch or beams_in");
  if (k < 1) throw std::invalid_argument("constrained_beam_step_cuda: k must be >= 1");
  if (beam_width < 1)
    throw std::invalid_argument("beam_width must be >= 1; got " + std::to_string(beam_width));
  if (batch > INT_MAX)
    throw std::invalid_argument("constrained_beam_step_cuda: at most 2^31 - 1 requests");
  // Candidate indices and histogram counts are 32-bit per request.
  if (beams_in > 0 && k > (int64_t{INT_MAX} - 1) / beams_in)
    throw std::invalid_argument("constrained_beam_step_cuda: beams_in * k must be < 2^31; got " +
                                std::to_string(beams_in) + " * " + std::to_string(k));
  if (beam_width > INT_MAX)
    throw std::invalid_argument("constrained_beam_step_cuda: beam_width must be < 2^31");
}

Layout plan(int64_t batch, int64_t beams_in, int64_t k, int64_t beam_width) {
  check_sizes(batch, beams_in, k, beam_width);
  Layout p;
  int64_t off = 0;
  auto take = [&](int64_t& at, int64_t bytes) {
    at = off;
    off += align_up(bytes);
  };
  take(p.lo, 8 * batch * beams_in);
  take(p.cnt, 8 * batch * beams_in);
  // Sized for kMaxSplits blocks per request, whatever a launch chooses: each block's start
  // offsets (its beams + 1) and its kept list (W) get their own slots.
  take(p.start, 8 * batch * (beams_in + kMaxSplits));
  take(p.bs, 4 * batch * beams_in);
  take(p.lse, 4 * batch * beams_in);
  take(p.cand, 4 * batch * beams_in * k);
  take(p.sel_score, 4 * batch * kMaxSplits * beam_width);
  take(p.sel_idx, 8 * batch * kMaxSplits * beam_width);
  take(p.part_score, 4 * batch * kMaxSplits * beam_width);
  take(p.part_key, 8 * batch * kMaxSplits * beam_width);
  take(p.part_count, 4 * batch * kMaxSplits);
  take(p.part_err, 8 * batch * kMaxSplits);
  p.bytes = off + kAlign;
  return p;
}

// ------------------------------------------------------------------------------ device code

// Order key of a score for "score descending": smaller key = better score. -0 and +0 map to
// the same key, as they compare equal (the tie rule then decides, as on the other backends).
__device__ __forceinline__ uint32_t desc_key(float s) {
  s = s == 0.0f ? 0.0f : s;
  const uint32_t u = __float_as_uint(s);
  const uint32_t asc = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~asc;
}

// Butterfly reductions: every lane ends with the same value (each step adds the same two
// operands, commutatively), and the order is fixed.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(kFullMask, v, off);
    v = o > v ? o : v;
  }
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = __fadd_rn(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// Exclusive prefix sum of v over the block in thread order; *total gets the block's sum.
// Called by every thread of the block (it synchronizes twice).
__device__ __forceinline__ int64_t block_scan(int64_t v, int64_t* warp_sums, int64_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t inc = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int64_t n = __shfl_up_sync(kFullMask, inc, off);
    if (lane >= off) inc += n;
  }
  if (lane == 31) warp_sums[warp] = inc;
  __syncthreads();
  int64_t before = 0, sum = 0;
#pragma unroll
  for (int i = 0; i < kWarps; ++i) {
    const int64_t s = warp_sums[i];
    before += i < warp ? s : 0;
    sum += s;
  }
  __syncthreads();
  *total = sum;
  return before + inc - v;
}

// Exclusive prefix count of a flag over the block in thread order (ballots).
__device__ __forceinline__ int block_scan_flag(bool f, int* warp_counts, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned ballot = __ballot_sync(kFullMask, f);
  if (lane == 0) warp_counts[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, sum = 0;
#pragma unroll
  for (int i = 0; i < kWarps; ++i) {
    const int c = warp_counts[i];
    before += i < warp ? c : 0;
    sum += c;
  }
  __syncthreads();
  *total = sum;
  return before + __popc(ballot & ((1u << lane) - 1u));
}

// The beam of candidate c (0 <= c < start[beams_in]): the first w with start[w + 1] > c.
__device__ __forceinline__ int64_t beam_of(const int64_t* start, int64_t beams_in, int64_t c) {
  int64_t l = 0, h = beams_in - 1;
  while (l < h) {
    const int64_t m = l + (h - l) / 2;
    if (start[m + 1] > c) {
      h = m;
    } else {
      l = m + 1;
    }
  }
  return l;
}

__device__ __forceinline__ void write_beam(const BeamStepArgs& a, int64_t o, float score,
                                           int64_t parent, int64_t token, int64_t state) {
  a.out_scores[o] = score;
  a.out_parent[o] = parent;
  a.out_token[o] = token;
  a.out_state[o] = state;
}

// Request b met an input error e = (beam << 8) | code: W poisoned beams and its status. Called
// by every thread of a block of `threads`.
__device__ void write_request_error(const BeamStepArgs& a, int64_t b, unsigned long long e,
                                    int tid, int threads) {
  for (int64_t j = tid; j < a.beam_width; j += threads)
    write_beam(a, b * a.beam_width + j, CUDART_NAN_F, -1, -1, -1);
  if (tid == 0) {
    a.status[2 * b] = static_cast<int32_t>(e & 0xff);
    a.status[2 * b + 1] = static_cast<int32_t>(e >> 8);
  }
}

// Request b's first `kept` output beams are written: pad the rest and set its status.
__device__ void finish_request(const BeamStepArgs& a, int64_t b, int64_t kept, int tid,
                               int threads) {
  for (int64_t j = kept + tid; j < a.beam_width; j += threads)
    write_beam(a, b * a.beam_width + j, -CUDART_INF_F, -1, -1, -1);
  if (tid == 0) {
    a.status[2 * b] = kept == 0 ? kBeamStatusEmpty : kBeamStatusOk;
    a.status[2 * b + 1] = -1;
  }
}

// Block `blockIdx.x` handles request b = blockIdx.x / splits, input beams [w0, w1) (its split's
// contiguous range). kSplit: write the block's kept list for beam_merge_kernel; otherwise
// (splits == 1) write the request's outputs.
template <bool kSplit>
__global__ void __launch_bounds__(kThreads)
    beam_step_kernel(const BeamStepArgs a, const Layout p, char* ws, int splits,
                     int rank_max) {
  const int64_t b = blockIdx.x / splits;
  const int split = static_cast<int>(blockIdx.x % splits);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t win = a.beams_in, k = a.k, W = a.beam_width;
  const int64_t chunk = (win + splits - 1) / splits;
  const int64_t w0 = split * chunk < win ? split * chunk : win;
  const int64_t w1 = w0 + chunk < win ? w0 + chunk : win;
  const int64_t nw = w1 - w0;  // this block's beams (may be 0)
  // Per-beam arrays are indexed by the request's beam w; the candidate slice and the start
  // offsets are this block's (candidate c is local: beams w0.. in order).
  int64_t* beam_lo = reinterpret_cast<int64_t*>(ws + p.lo) + b * win;
  int64_t* beam_cnt = reinterpret_cast<int64_t*>(ws + p.cnt) + b * win;
  int64_t* start = reinterpret_cast<int64_t*>(ws + p.start) + b * (win + kMaxSplits) + w0 + split;
  float* beam_bs = reinterpret_cast<float*>(ws + p.bs) + b * win;
  float* beam_lse = reinterpret_cast<float*>(ws + p.lse) + b * win;
  float* cand = reinterpret_cast<float*>(ws + p.cand) + (b * win + w0) * k;
  const int64_t part = b * kMaxSplits + split;
  float* sel_score = reinterpret_cast<float*>(ws + p.sel_score) + part * W;
  int64_t* sel_idx = reinterpret_cast<int64_t*>(ws + p.sel_idx) + part * W;
  const uint8_t* allowed = a.allowed ? a.allowed + b * a.ld_allowed : nullptr;
  const float* logits = a.logits + b * a.ld_b;
  const bool normalized = a.normalize != BeamNormalize::kNone;

  __shared__ unsigned hist[256];
  __shared__ float sh_cand[kRankCap];
  __shared__ int64_t warp_sums[kWarps];
  __shared__ int warp_counts[kWarps];
  __shared__ unsigned long long first_error;  // (beam << 8) | code of the first failing beam
  __shared__ unsigned sh_bin, sh_count, sh_bin_count;
  __shared__ int64_t sh_rank;
  __shared__ int sh_kept;

  for (int i = tid; i < 256; i += kThreads) hist[i] = 0;
  if (tid == 0) {
    first_error = kNoError;
    sh_kept = 0;
  }
  __syncthreads();

  // 1. One warp per beam: checks and log-sum-exp. Every branch below depends only on values
  // shared by the warp, so the warp-wide shuffles inside are uniform.
  for (int64_t w = w0 + warp; w < w1; w += kWarps) {
    // The loads that do not depend on each other are issued together (score, state, then the
    // node's offsets while the row is scanned): a beam costs three memory round trips in turn
    // (state, offsets, children) instead of five.
    const float bs = a.beam_scores[b * win + w];
    const int64_t s = a.states[b * win + w];
    const bool state_ok = s >= 0 && s < a.num_nodes;
    int64_t lo = 0, hi = 0;
    if (bs != -CUDART_INF_F && state_ok) {
      lo = a.child_offsets[s];
      hi = a.child_offsets[s + 1];
    }
    int code = kBeamStatusOk;
    int64_t cnt = 0;
    float lse = -CUDART_INF_F;
    if (bs != -CUDART_INF_F) {
      const float* row = logits + w * a.ld_w;
      if (!(bs < CUDART_INF_F)) {
        code = kBeamStatusBadScore;
      } else if (!state_ok) {
        code = kBeamStatusBadState;
      } else {
        float m = -CUDART_INF_F;
        bool bad = false;
        for (int64_t i = lane; i < k; i += 32) {
          const float v = row[i];
          m = v > m ? v : m;
          bad = bad || !(v < CUDART_INF_F);
        }
        m = warp_max(m);
        if (__any_sync(kFullMask, bad)) {
          code = kBeamStatusBadLogit;
        } else if (lo < 0 || lo > hi || hi > a.slots || hi - lo > k) {
          code = kBeamStatusBadTrie;
        } else {
          bool corrupt = false;
          for (int64_t e = lo + lane; e < hi; e += 32) {
            const int64_t tok = a.child_tokens[e], node = a.child_nodes[e];
            corrupt = corrupt || tok < 0 || tok >= k || node < 0 || node >= a.num_nodes;
          }
          if (__any_sync(kFullMask, corrupt)) {
            code = kBeamStatusBadTrie;
          } else {
            if (a.normalize == BeamNormalize::kFull) {
              if (m > -CUDART_INF_F) {
                float sum = 0.0f;
                for (int64_t i = lane; i < k; i += 32) sum = __fadd_rn(sum, expf(row[i] - m));
                lse = __fadd_rn(m, logf(warp_sum(sum)));
              }
            } else if (a.normalize == BeamNormalize::kValid) {
              float mv = -CUDART_INF_F;
              for (int64_t e = lo + lane; e < hi; e += 32) {
                if (allowed && !allowed[a.child_nodes[e]]) continue;
                const float x = row[a.child_tokens[e]];
                mv = x > mv ? x : mv;
              }
              mv = warp_max(mv);
              if (mv > -CUDART_INF_F) {
                float sum = 0.0f;
                for (int64_t e = lo + lane; e < hi; e += 32) {
                  if (allowed && !allowed[a.child_nodes[e]]) continue;
                  sum = __fadd_rn(sum, expf(row[a.child_tokens[e]] - mv));
                }
                lse = __fadd_rn(mv, logf(warp_sum(sum)));
              }
            } else {
              lse = 0.0f;
            }
            // lse == -inf: every relevant logit is -inf, so no finite candidate.
            if (lse > -CUDART_INF_F) cnt = hi - lo;
          }
        }
      }
    }
    if (lane == 0) {
      beam_lo[w] = lo;
      beam_cnt[w] = cnt;
      beam_bs[w] = bs;
      beam_lse[w] = lse;
      if (code != kBeamStatusOk)
        atomicMin(&first_error, (static_cast<unsigned long long>(w) << 8) | code);
    }
  }
  __syncthreads();

  if (kSplit && tid == 0)
    reinterpret_cast<unsigned long long*>(ws + p.part_err)[part] = first_error;
  if (first_error != kNoError) {  // an input error: poison the request (uniform branch)
    if constexpr (kSplit) {  // the merge kernel reports the request's first error
      if (tid == 0) reinterpret_cast<int32_t*>(ws + p.part_count)[part] = 0;
    } else {
      write_request_error(a, b, first_error, tid, kThreads);
    }
    return;
  }

  // 2. start[i] = candidates of this block's beams before beam w0 + i.
  int64_t total = 0;
  for (int64_t base = 0; base < nw; base += kThreads) {
    const int64_t i = base + tid;
    int64_t sum;
    const int64_t before = block_scan(i < nw ? beam_cnt[w0 + i] : 0, warp_sums, &sum);
    if (i < nw) start[i] = total + before;
    total += sum;
  }
  if (tid == 0) start[nw] = total;
  __syncthreads();

  // 3. Score every candidate once (one warp per beam, its children across the lanes), into
  // shared memory when the block ranks them directly, else into the workspace with a histogram
  // of the top byte of the valid ones' keys.
  const bool direct = total <= rank_max;
  float* scores = direct ? sh_cand : cand;
  for (int64_t w = w0 + warp; w < w1; w += kWarps) {
    const int64_t cw = beam_cnt[w];  // 0 for padding, failing and candidate-less beams
    if (cw == 0) continue;
    const int64_t lo = beam_lo[w], first = start[w - w0];
    const float bs = beam_bs[w], lse = beam_lse[w];
    const float* row = logits + w * a.ld_w;
    for (int64_t j = lane; j < cw; j += 32) {
      const int64_t e = lo + j;
      float s = -CUDART_INF_F;
      if (!allowed || allowed[a.child_nodes[e]]) {
        const float x = row[a.child_tokens[e]];
        s = normalized ? __fadd_rn(bs, __fsub_rn(x, lse)) : __fadd_rn(bs, x);
      }
      scores[first + j] = s;
      if (!direct && s > -CUDART_INF_F) atomicAdd(&hist[desc_key(s) >> 24], 1u);
    }
  }
  __syncthreads();

  // Candidate c of rank `rank` (< W) goes to the outputs, or to the block's list in a split step.
  auto place = [&](int64_t rank, float score, int64_t c) {
    const int64_t lw = beam_of(start, nw, c);
    if constexpr (kSplit) {
      reinterpret_cast<float*>(ws + p.part_score)[part * W + rank] = score;
      reinterpret_cast<int64_t*>(ws + p.part_key)[part * W + rank] =
          ((w0 + lw) << 32) | (c - start[lw]);
    } else {  // w0 == 0
      const int64_t e = beam_lo[lw] + (c - start[lw]);
      write_beam(a, b * W + rank, score, lw, a.child_tokens[e], a.child_nodes[e]);
    }
  };

  int64_t kept = 0;
  if (direct) {
    // 4'. Rank = candidates with a higher score + earlier candidates with the same score
    // (candidate order is (parent, token) order): the tie rule, with no selection passes.
    for (int64_t c = tid; c < total; c += kThreads) {
      const float si = sh_cand[c];
      if (!(si > -CUDART_INF_F)) continue;
      atomicAdd(&sh_kept, 1);
      int64_t rank = 0;
      for (int64_t j = 0; j < total; ++j) {
        const float sj = sh_cand[j];
        rank += (sj > si) || (sj == si && j < c);
      }
      if (rank < W) place(rank, si, c);
    }
    __syncthreads();
    kept = sh_kept < W ? sh_kept : W;
  } else {
    // 4. Radix select over the keys' bytes, most significant first: after a pass, `thr` holds
    // the bytes (under `mask`) of the W-th best key, and `need_eq` of the candidates whose masked
    // key equals thr are kept (the first ones in candidate order). It stops early when every
    // valid candidate is kept (take_all) or when all of the matching bin's candidates are kept
    // (all_eq): then no order among them is needed.
    uint32_t thr = 0, mask = 0;
    int64_t need_eq = W;
    bool take_all = false, all_eq = false;
    for (int pass = 0; pass < 4; ++pass) {
      const int shift = 24 - 8 * pass;
      if (pass > 0) {
        for (int64_t c = tid; c < total; c += kThreads) {
          const float s = cand[c];
          if (!(s > -CUDART_INF_F)) continue;
          const uint32_t key = desc_key(s);
          if ((key & mask) == thr) atomicAdd(&hist[(key >> shift) & 0xffu], 1u);
        }
        __syncthreads();
      }
      if (warp == 0) {  // the bin holding the need_eq-th smallest key (8 bins per lane)
        unsigned local = 0;
  #pragma unroll
        for (int j = 0; j < 8; ++j) local += hist[lane * 8 + j];
        unsigned inc = local;
  #pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
          const unsigned n = __shfl_up_sync(kFullMask, inc, off);
          if (lane >= off) inc += n;
        }
        const unsigned all = __shfl_sync(kFullMask, inc, 31);
        if (lane == 0) sh_count = all;
        unsigned before = inc - local;
        if (static_cast<int64_t>(before) < need_eq && need_eq <= static_cast<int64_t>(inc)) {
          for (int j = 0; j < 8; ++j) {
            const unsigned h = hist[lane * 8 + j];
            if (need_eq <= static_cast<int64_t>(before + h)) {
              sh_bin = lane * 8 + j;
              sh_bin_count = h;
              sh_rank = need_eq - before;
              break;
            }
            before += h;
          }
        }
      }
      __syncthreads();
      if (pass == 0 && static_cast<int64_t>(sh_count) <= W) {  // keep every valid candidate
        take_all = true;
        break;
      }
      thr |= sh_bin << shift;
      mask |= 0xffu << shift;
      need_eq = sh_rank;
      all_eq = need_eq == static_cast<int64_t>(sh_bin_count);
      for (int i = tid; i < 256; i += kThreads) hist[i] = 0;
      __syncthreads();
      if (all_eq) break;
    }
    if (take_all) {  // every valid key is < 0xffffffff (that is NaN's key, and NaN never occurs)
      thr = 0xffffffffu;
      mask = 0xffffffffu;
      need_eq = 0;
    }

    // 5a. Keep the candidates whose masked key is below the threshold (with all_eq: or equal
    // to it), in any order (5b orders them), then, when only some of the candidates with the
    // exact threshold key are kept, the first need_eq of those in candidate order (block scans
    // keep thread order = candidate order).
    for (int64_t c = tid; c < total; c += kThreads) {
      const float s = cand[c];
      if (!(s > -CUDART_INF_F)) continue;
      const uint32_t key = desc_key(s) & mask;
      if (key < thr || (all_eq && key == thr)) {
        const int pos = atomicAdd(&sh_kept, 1);
        sel_score[pos] = s;
        sel_idx[pos] = c;
      }
    }
    __syncthreads();
    kept = sh_kept;
    if (!all_eq && need_eq > 0) {  // mask is full here: thr is the W-th best key itself
      int64_t eq_seen = 0;
      for (int64_t base = 0; base < total && eq_seen < need_eq; base += kThreads) {
        const int64_t c = base + tid;
        float s = -CUDART_INF_F;
        bool eq = false;
        if (c < total) {
          s = cand[c];
          eq = s > -CUDART_INF_F && desc_key(s) == thr;
        }
        int n_eq;
        const int eq_before = block_scan_flag(eq, warp_counts, &n_eq);
        if (eq && eq_seen + eq_before < need_eq) {
          sel_score[kept + eq_seen + eq_before] = s;
          sel_idx[kept + eq_seen + eq_before] = c;
        }
        eq_seen += n_eq;
      }
      kept += eq_seen < need_eq ? eq_seen : need_eq;
    }
    __syncthreads();

    // 5b. Place the kept candidates by rank.
    for (int64_t i = tid; i < kept; i += kThreads) {
      const float si = sel_score[i];
      const int64_t ci = sel_idx[i];
      int64_t rank = 0;
      for (int64_t j = 0; j < kept; ++j) {
        const float sj = sel_score[j];
        rank += (sj > si) || (sj == si && sel_idx[j] < ci);
      }
      place(rank, si, ci);
    }
  }
  // The rest padded; a split step's count for the merge.
  if constexpr (kSplit) {
    if (tid == 0) reinterpret_cast<int32_t*>(ws + p.part_count)[part] = static_cast<int32_t>(kept);
  } else {
    finish_request(a, b, kept, tid, kThreads);
  }
}

// Merge of a split step: request b's top W from its blocks' kept lists, by (score desc, beam
// asc, child slot asc) = (score desc, parent asc, token asc); or, when any block met an input
// error, the first one in beam order (the smallest (beam << 8 | code)). Each list is in rank
// order and block t's beams all precede block t + 1's, so the rank of entry p of list s is
// p + (entries of earlier lists with a score >= its score) + (entries of later lists with a
// score > its score): one binary search per other list.
__global__ void __launch_bounds__(kMergeThreads)
    beam_merge_kernel(const BeamStepArgs a, const Layout p, char* ws, int splits) {
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t W = a.beam_width;
  const int64_t first = b * kMaxSplits;
  const int32_t* part_count = reinterpret_cast<const int32_t*>(ws + p.part_count) + first;
  const unsigned long long* part_err =
      reinterpret_cast<const unsigned long long*>(ws + p.part_err) + first;
  const float* part_score = reinterpret_cast<const float*>(ws + p.part_score) + first * W;
  const int64_t* part_key = reinterpret_cast<const int64_t*>(ws + p.part_key) + first * W;
  const int64_t* beam_lo = reinterpret_cast<const int64_t*>(ws + p.lo) + b * a.beams_in;

  __shared__ float sh_score[kMergeCap];
  __shared__ int sh_off[kMaxSplits + 1];
  __shared__ unsigned long long sh_err;
  if (tid == 0) {
    unsigned long long e = kNoError;
    int n = 0;
    for (int s = 0; s < splits; ++s) {
      e = part_err[s] < e ? part_err[s] : e;
      sh_off[s] = n;
      n += part_err[s] == kNoError ? part_count[s] : 0;
    }
    sh_off[splits] = n;
    sh_err = e;
  }
  __syncthreads();
  if (sh_err != kNoError) {
    write_request_error(a, b, sh_err, tid, kMergeThreads);
    return;
  }
  for (int s = 0; s < splits; ++s) {
    const int off = sh_off[s], cnt = sh_off[s + 1] - off;
    for (int i = tid; i < cnt; i += kMergeThreads) sh_score[off + i] = part_score[s * W + i];
  }
  __syncthreads();
  const int n = sh_off[splits];
  for (int s = 0; s < splits; ++s) {
    const int off = sh_off[s], cnt = sh_off[s + 1] - off;
    for (int i = tid; i < cnt; i += kMergeThreads) {
      const float si = sh_score[off + i];
      int64_t rank = i;
      for (int t = 0; t < splits && rank < W; ++t) {
        if (t == s) continue;
        // entries of list t that rank before (si, this key): score >= si when t < s, > si when
        // t > s; the lists descend, so that is a prefix of list t.
        int l = sh_off[t], h = sh_off[t + 1];
        while (l < h) {
          const int m = (l + h) / 2;
          const float x = sh_score[m];
          if (t < s ? x >= si : x > si) {
            l = m + 1;
          } else {
            h = m;
          }
        }
        rank += l - sh_off[t];
      }
      if (rank >= W) continue;
      const int64_t key = part_key[s * W + i];
      const int64_t w = key >> 32;
      const int64_t e = beam_lo[w] + (key & 0xffffffffll);
      write_beam(a, b * W + rank, si, w, a.child_tokens[e], a.child_nodes[e]);
    }
  }
  finish_request(a, b, n < W ? n : W, tid, kMergeThreads);
}

// Blocks per request. Each block has a fixed latency (its chain of dependent memory reads,
// block syncs and radix passes), so splitting pays only where a request has many candidates
// and the batch leaves SMs idle. With K = 256, two blocks per request sped up the widest step
// at (B, W) = (64, 50) (12.5k candidates per request) and cost a little at the root and deep
// levels; at (16, 20) (5k candidates at most) splitting lost more at the root and deep levels
// than it gained, and three or more blocks were slower everywhere (the sweep is in
// bench/RESULTS.md). Hence: 2 when beams_in * k >= 8192 and batch <= the SM count, else 1.
// SIGMA_FAST_BEAM_SPLITS=s (1..kMaxSplits) overrides it.
int choose_splits(int64_t batch, int64_t beams_in, int64_t k, int64_t beam_width) {
  int s = 0;
  if (const char* env = std::getenv("SIGMA_FAST_BEAM_SPLITS")) s = std::atoi(env);
  if (s <= 0) {
    int device = 0, sms = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      cudaGetLastError();  // clear it: the launch reports real failures
      sms = 0;
    }
    s = beams_in * k >= 8192 && batch <= sms ? 2 : 1;
  }
  s = std::min<int>(s, kMaxSplits);
  while (s > 1 && s * beam_width > kMergeCap) --s;
  return std::max(1, std::min<int>(s, static_cast<int>(std::max<int64_t>(1, beams_in))));
}

}  // namespace

int64_t constrained_beam_step_cuda_workspace_bytes(int64_t batch, int64_t beams_in, int64_t k,
                                                   int64_t beam_width) {
  return plan(batch, beams_in, k, beam_width).bytes;
}

void constrained_beam_step_cuda(const BeamStepArgs& a, cudaStream_t stream) {
  check_beam_step_args(a);
  const Layout p = plan(a.batch, a.beams_in, a.k, a.beam_width);
  if (a.batch == 0) return;
  if (a.workspace_bytes < p.bytes)
    throw std::invalid_argument("constrained_beam_step_cuda: workspace of " +
                                std::to_string(a.workspace_bytes) + " bytes; needs " +
                                std::to_string(p.bytes));
  if (!a.workspace || !a.out_scores || !a.out_parent || !a.out_token || !a.out_state ||
      !a.status || !a.child_offsets || (a.beams_in > 0 && (!a.logits || !a.beam_scores ||
                                                           !a.states)))
    throw std::invalid_argument("constrained_beam_step_cuda: null pointer");
  char* base = reinterpret_cast<char*>(
      (reinterpret_cast<std::uintptr_t>(a.workspace) + kAlign - 1) / kAlign * kAlign);
  const int splits = choose_splits(a.batch, a.beams_in, a.k, a.beam_width);
  int rank_max = kRankDefault;
  if (const char* env = std::getenv("SIGMA_FAST_BEAM_RANK_MAX")) rank_max = std::atoi(env);
  rank_max = std::max(0, std::min(rank_max, kRankCap));
  if (a.batch > INT_MAX / splits)
    throw std::invalid_argument("constrained_beam_step_cuda: too many requests");
  const unsigned blocks = static_cast<unsigned>(a.batch * splits);
  if (splits == 1) {
    beam_step_kernel<false><<<blocks, kThreads, 0, stream>>>(a, p, base, 1, rank_max);
  } else {
    beam_step_kernel<true><<<blocks, kThreads, 0, stream>>>(a, p, base, splits, rank_max);
    beam_merge_kernel<<<static_cast<unsigned>(a.batch), kMergeThreads, 0, stream>>>(a, p, base,
                                                                                   splits);
  }
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("sigma_fast CUDA: beam step launch failed: ") +
                             cudaGetErrorString(status));
}

}  // namespace sigma_fast
