#include "beam_step_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace sigma_fast {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kLanes = 8;

// exp(x) for x <= 0 in float32 (Cephes polynomial, ~1 ulp); exp(0) is exactly 1, which keeps
// every log-softmax value <= 0 (the step prunes beams with that bound). Inputs below -87 are
// clamped (their exp, < 2e-38, does not change a sum that contains exp(0) = 1). Fused
// multiply-adds (std::fma here, the FMA instructions in the AVX2 twin) in the same places, so
// both give the same bits.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::fma(x, 1.44269504088896341f, 12582912.0f) - 12582912.0f;  // round
  float r = std::fma(-n, 0.693359375f, x);
  r = std::fma(-n, -2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p * r, r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Row maximum, whether the row holds NaN or +inf, and the sums of x and |x| (for a lower bound
// of the log-sum-exp). Lane-blocked from index 0 so max and bad depend only on the values.
struct RowScan {
  float max;
  bool bad;
  float sum, sum_abs;
};

RowScan scan_row_generic(const float* x, int64_t k) {
  float mx[kLanes], sum[kLanes], sum_abs[kLanes];
  int bad[kLanes];
  for (int j = 0; j < kLanes; ++j) mx[j] = -kInf, bad[j] = 0, sum[j] = 0.0f, sum_abs[j] = 0.0f;
  int64_t i = 0;
  for (; i + kLanes <= k; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float v = x[i + j];
      mx[j] = v > mx[j] ? v : mx[j];
      bad[j] |= !(v < kInf);
      sum[j] += v;
      sum_abs[j] += std::fabs(v);
    }
  for (int j = 0; j < kLanes && i + j < k; ++j) {
    const float v = x[i + j];
    mx[0] = v > mx[0] ? v : mx[0];
    bad[0] |= !(v < kInf);
    sum[0] += v;
    sum_abs[0] += std::fabs(v);
  }
  RowScan out{-kInf, false, 0.0f, 0.0f};
  for (int j = 0; j < kLanes; ++j) {
    out.max = mx[j] > out.max ? mx[j] : out.max;
    out.bad = out.bad || bad[j];
    out.sum += sum[j];
    out.sum_abs += sum_abs[j];
  }
  return out;
}

// sum_i exp(x[i] - m), summed in kLanes fixed lanes combined pairwise (deterministic).
float sum_exp_generic(const float* x, int64_t k, float m) {
  float acc[kLanes];
  for (int j = 0; j < kLanes; ++j) acc[j] = 0.0f;
  int64_t i = 0;
  for (; i + kLanes <= k; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += exp_nonpositive(x[i + j] - m);
  for (int j = 0; j < kLanes && i + j < k; ++j) acc[j] += exp_nonpositive(x[i + j] - m);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

#if defined(__x86_64__) || defined(__i386__)
// The same operations as the generic versions, 8 lanes at a time (lane j of the vector is
// accumulator j), so both agree bitwise.
__attribute__((target("avx2"))) RowScan scan_row_avx2(const float* x, int64_t k) {
  __m256 mx = _mm256_set1_ps(-kInf), bad = _mm256_setzero_ps();
  __m256 sum = _mm256_setzero_ps(), sum_abs = _mm256_setzero_ps();
  const __m256 inf = _mm256_set1_ps(kInf);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  int64_t i = 0;
  for (; i + kLanes <= k; i += kLanes) {
    const __m256 v = _mm256_loadu_ps(x + i);
    mx = _mm256_max_ps(v, mx);                                 // v > mx ? v : mx
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, inf, _CMP_NLT_UQ));  // !(v < inf)
    sum = _mm256_add_ps(sum, v);
    sum_abs = _mm256_add_ps(sum_abs, _mm256_and_ps(v, abs_mask));
  }
  alignas(32) float m[kLanes], s[kLanes], sa[kLanes];
  _mm256_store_ps(m, mx);
  _mm256_store_ps(s, sum);
  _mm256_store_ps(sa, sum_abs);
  RowScan out{-kInf, _mm256_movemask_ps(bad) != 0, 0.0f, 0.0f};
  for (int j = 0; j < kLanes && i + j < k; ++j) {
    const float v = x[i + j];
    m[0] = v > m[0] ? v : m[0];
    out.bad = out.bad || !(v < kInf);
    s[0] += v;
    sa[0] += std::fabs(v);
  }
  for (int j = 0; j < kLanes; ++j) {
    out.max = m[j] > out.max ? m[j] : out.max;
    out.sum += s[j];
    out.sum_abs += sa[j];
  }
  return out;
}

__attribute__((target("avx2,fma"))) inline __m256 exp_nonpositive8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  // x < -87 ? -87 : x (no NaN here)
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 n =
      _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic), magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // fma(-n, c, x)
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

__attribute__((target("avx2,fma"))) float sum_exp_avx2(const float* x, int64_t k, float m) {
  __m256 acc = _mm256_setzero_ps();
  const __m256 mv = _mm256_set1_ps(m);
  int64_t i = 0;
  for (; i + kLanes <= k; i += kLanes)
    acc = _mm256_add_ps(acc, exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv)));
  alignas(32) float a[kLanes];
  _mm256_store_ps(a, acc);
  for (int j = 0; j < kLanes && i + j < k; ++j) a[j] += exp_nonpositive(x[i + j] - m);
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

bool have_avx2() {
  static const bool ok = (__builtin_cpu_init(), __builtin_cpu_supports("avx2") != 0);
  return ok;
}

bool have_avx2_fma() {
  static const bool ok = have_avx2() && __builtin_cpu_supports("fma") != 0;
  return ok;
}
#endif

// Both variants run the same float operations in the same order, so they agree bitwise.
inline RowScan scan_row(const float* x, int64_t k) {
#if defined(__x86_64__) || defined(__i386__)
  if (have_avx2()) return scan_row_avx2(x, k);
#endif
  return scan_row_generic(x, k);
}

inline float sum_exp(const float* x, int64_t k, float m) {
#if defined(__x86_64__) || defined(__i386__)
  if (have_avx2_fma()) return sum_exp_avx2(x, k, m);
#endif
  return sum_exp_generic(x, k, m);
}

// log(sum exp(x)) given the maximum m; -inf when every value is -inf.
inline float log_sum_exp(float m, float sum) {
  return m == -kInf ? -kInf : m + std::log(sum);
}

// A lower bound of the row's computed log-sum-exp, for skipping rows that cannot contribute:
// lse >= max (exactly, see exp_nonpositive) and lse >= log K + mean(x) (Jensen), the latter
// lowered by a margin far above the float32 error of both sides.
inline float lse_lower_bound(const RowScan& scan, int64_t k, double log_k) {
  if (k == 0 || !(scan.sum > -kInf) || !(scan.sum_abs < kInf)) return scan.max;
  const double mean = static_cast<double>(scan.sum) / static_cast<double>(k);
  const double jensen = log_k + mean;
  const double margin = 1e-3 * (1.0 + std::fabs(jensen) + scan.sum_abs / static_cast<double>(k));
  const float bound = static_cast<float>(jensen - margin);
  return bound > scan.max ? bound : scan.max;
}

// A candidate with its ranking key: `key` holds the score, mapped to an unsigned integer that
// grows as the score falls (-0.0 and +0.0 map alike, as they compare equal), above the parent
// beam; ties of the key go to the smaller token. One integer comparison decides almost every
// pair, which keeps the selection (nth_element, sort) cheap.
struct Candidate {
  uint64_t key;
  int64_t node;
  int32_t token;
  float score;
};

inline uint64_t rank_key(float score, int64_t parent) {
  const float s = score + 0.0f;  // -0.0 -> +0.0
  uint32_t u;
  std::memcpy(&u, &s, sizeof(u));
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // ascending with the score
  return (static_cast<uint64_t>(~u) << 32) | static_cast<uint32_t>(parent);
}

// a ranks before b: higher score, then smaller parent, then smaller token.
struct RanksBefore {
  bool operator()(const Candidate& a, const Candidate& b) const {
    return a.key != b.key ? a.key < b.key : a.token < b.token;
  }
};

std::string beam_name(int64_t b, int64_t w) {
  return "request " + std::to_string(b) + ", beam " + std::to_string(w);
}

// A live beam of the request being stepped.
struct LiveBeam {
  int64_t w, lo, hi;  // input beam index, its node's child slots [lo, hi)
  float bs, max, lse; // beam score, row max, log-sum-exp (NaN until computed)
  float lse_bound;    // lower bound of lse (exact lse when known)
  float best;         // upper bound of the beam's best candidate score
};

// Cache lines of the trie and the logits a request will read, fetched ahead of time (see
// constrained_beam_step_cpu): the beams' nodes are scattered over the trie's arrays and each
// logit row sits in its own page of a wider LM row, so without this every beam waits on a few
// memory round trips in turn.
inline bool live_state(const BeamStepArgs& a, int64_t i) {
  const int64_t s = a.states[i];
  return a.beam_scores[i] != -kInf && s >= 0 && s < a.num_nodes;
}

void prefetch_offsets(const BeamStepArgs& a, int64_t b) {
  for (int64_t i = b * a.beams_in, end = i + a.beams_in; i < end; ++i)
    if (live_state(a, i)) __builtin_prefetch(a.child_offsets + a.states[i]);
}

void prefetch_children(const BeamStepArgs& a, int64_t b) {
  for (int64_t i = b * a.beams_in, end = i + a.beams_in; i < end; ++i) {
    if (!live_state(a, i)) continue;
    const int64_t s = a.states[i];
    const int64_t lo = a.child_offsets[s], hi = a.child_offsets[s + 1];
    if (lo < 0 || lo >= hi || hi > a.slots) continue;
    const int64_t last = std::min<int64_t>(hi, lo + 32);  // at most a few lines per list
    for (int64_t e = lo; e < last; e += 8) {
      __builtin_prefetch(a.child_tokens + e);
      __builtin_prefetch(a.child_nodes + e);
    }
  }
}

// Rows of beams [w0, w1) of request b (and the validity byte of each one's first child). A
// request's rows are fetched kRowsAhead beams ahead of its row scans (the first kRowsAhead
// during the previous request), which spreads the requests out: a whole request's rows at once
// (50 rows = 800 lines at (64, 50)) overrun the outstanding-miss queues.
constexpr int64_t kRowsAhead = 4;

void prefetch_rows(const BeamStepArgs& a, int64_t b, int64_t w0, int64_t w1) {
  const uint8_t* allowed = a.allowed ? a.allowed + b * a.ld_allowed : nullptr;
  for (int64_t w = w0; w < w1 && w < a.beams_in; ++w) {
    const int64_t i = b * a.beams_in + w;
    if (!live_state(a, i)) continue;
    const char* row = reinterpret_cast<const char*>(a.logits + b * a.ld_b + w * a.ld_w);
    const int64_t bytes = a.k * static_cast<int64_t>(sizeof(float));
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off, 0, 2);
    if (allowed) {
      const int64_t s = a.states[i];
      const int64_t lo = a.child_offsets[s], hi = a.child_offsets[s + 1];
      if (lo < 0 || lo >= hi || hi > a.slots) continue;
      const int64_t c = a.child_nodes[lo];
      if (c >= 0 && c < a.num_nodes) __builtin_prefetch(allowed + c);
    }
  }
}

// Top-W candidates of one request, exactly by (score desc, parent asc, token asc).
//  1. Check every live beam (scores, states, NaN / +inf logits, trie ranges) and bound its best
//     candidate score using a lower bound of its log-sum-exp.
//  2. Visit beams from the best bound down. `threshold` is the W-th best score found so far;
//     a beam whose bound is below it cannot contribute, and neither can any beam after it.
//     Accepted candidates (score >= threshold: equal scores may still win on the tie rule) go
//     to a buffer cut back to the best W whenever it holds 2W (O(1) amortized each).
// Only beams that can contribute pay for the log-sum-exp over their row. Scores are computed
// as bs + (x - lse) in float32 (bs + x without normalization); they are monotone in x and
// decrease in lse, so a bound of lse bounds the scores exactly.
void step_request(const BeamStepArgs& a, int64_t b, std::vector<Candidate>& buf,
                  std::vector<LiveBeam>& beams, std::vector<int64_t>& ranges) {
  const int64_t W = a.beam_width;
  const RanksBefore ranks_before;
  const uint8_t* allowed = a.allowed ? a.allowed + b * a.ld_allowed : nullptr;
  const bool normalized = a.normalize != BeamNormalize::kNone;
  const double log_k = a.k > 0 ? std::log(static_cast<double>(a.k)) : 0.0;
  buf.clear();
  beams.clear();

  auto node_of = [&](int64_t e) -> int64_t {  // node of slot e, or -1 if not allowed
    const int64_t c = a.child_nodes[e];
    if (c < 0 || c >= a.num_nodes)
      throw std::out_of_range("corrupt trie: child_nodes[" + std::to_string(e) + "] = " +
                              std::to_string(c));
    return allowed && !allowed[c] ? -1 : c;
  };

  // 0. The live beams' child ranges, read in a loop of independent loads (so their cache misses
  // overlap instead of waiting on each other between row scans), then their child lists
  // requested. States are checked here only to stay in bounds; 1. reports bad ones in order.
  ranges.resize(static_cast<size_t>(2 * a.beams_in));
  int64_t* range = ranges.data();
  for (int64_t w = 0; w < a.beams_in; ++w) {
    const int64_t i = b * a.beams_in + w;
    if (!live_state(a, i)) continue;
    range[2 * w] = a.child_offsets[a.states[i]];
    range[2 * w + 1] = a.child_offsets[a.states[i] + 1];
  }
  for (int64_t w = 0; w < a.beams_in; ++w) {
    if (!live_state(a, b * a.beams_in + w)) continue;
    const int64_t lo = range[2 * w], hi = range[2 * w + 1];
    if (lo < 0 || lo >= hi || hi > a.slots) continue;
    __builtin_prefetch(a.child_tokens + lo);
    __builtin_prefetch(a.child_nodes + lo);
  }

  // 1. Check and bound every live beam.
  for (int64_t w = 0; w < a.beams_in; ++w) {
    prefetch_rows(a, b, w + kRowsAhead, w + kRowsAhead + 1);
    const float bs = a.beam_scores[b * a.beams_in + w];
    if (bs == -kInf) continue;  // padding beam
    if (!(bs < kInf))
      throw std::invalid_argument("beam_scores must be finite or -inf (padding); got " +
                                  std::to_string(bs) + " at " + beam_name(b, w));
    const int64_t s = a.states[b * a.beams_in + w];
    if (s < 0 || s >= a.num_nodes)
      throw std::out_of_range("states must lie in [0, " + std::to_string(a.num_nodes) +
                              ") for non-padding beams; got " + std::to_string(s) + " at " +
                              beam_name(b, w));
    const float* row = a.logits + b * a.ld_b + w * a.ld_w;
    const RowScan scan = scan_row(row, a.k);
    if (scan.bad) {
      int64_t i = 0;
      while (i < a.k && row[i] < kInf) ++i;
      throw std::invalid_argument("logits must not be NaN or +inf; got " + std::to_string(row[i]) +
                                  " at " + beam_name(b, w) + ", index " + std::to_string(i));
    }
    const int64_t lo = range[2 * w], hi = range[2 * w + 1];  // read in 0. (a live state)
    if (lo < 0 || lo > hi || hi > a.slots)
      throw std::out_of_range("corrupt trie: child_offsets of node " + std::to_string(s));
    float best_x = -kInf;  // best logit among the allowed children
    for (int64_t e = lo; e < hi; ++e) {  // memory safety: every token indexes the row
      const int64_t tok = a.child_tokens[e];
      if (static_cast<uint64_t>(tok) >= static_cast<uint64_t>(a.k))
        throw std::out_of_range("trie token " + std::to_string(tok) + " (child of node " +
                                std::to_string(s) + ") is outside the logits' range [0, " +
                                std::to_string(a.k) + ") at " + beam_name(b, w));
      if (row[tok] > best_x && node_of(e) >= 0) best_x = row[tok];
    }
    if (best_x == -kInf) continue;  // no allowed child with a finite logit: no candidate
    LiveBeam lb{w, lo, hi, bs, scan.max, std::numeric_limits<float>::quiet_NaN(), 0.0f, 0.0f};
    if (a.normalize == BeamNormalize::kFull) {
      lb.lse_bound = lse_lower_bound(scan, a.k, log_k);
    } else if (a.normalize == BeamNormalize::kValid) {
      float sum = 0.0f;  // the exact lse over the allowed children is cheap: compute it now
      for (int64_t e = lo; e < hi; ++e)
        if (node_of(e) >= 0) sum += exp_nonpositive(row[a.child_tokens[e]] - best_x);
      lb.lse = lb.lse_bound = log_sum_exp(best_x, sum);
    } else {
      lb.lse = lb.lse_bound = 0.0f;
    }
    lb.best = normalized ? bs + (best_x - lb.lse_bound) : bs + best_x;
    if (lb.best > -kInf) beams.push_back(lb);
  }

  // 2. Best bound first; ties keep beam order.
  std::sort(beams.begin(), beams.end(), [](const LiveBeam& x, const LiveBeam& y) {
    return x.best != y.best ? x.best > y.best : x.w < y.w;
  });
  float threshold = -kInf;  // the W-th best score so far (-inf until W candidates)
  bool have_w = false;
  auto accept = [&](float score, int64_t w, int64_t tok, int64_t node) {
    buf.push_back(Candidate{rank_key(score, w), node, static_cast<int32_t>(tok), score});
    const int64_t size = static_cast<int64_t>(buf.size());
    if (!have_w && size == W) {
      have_w = true;
      threshold = buf[0].score;
      for (const Candidate& x : buf) threshold = x.score < threshold ? x.score : threshold;
    } else if (size == 2 * W) {
      std::nth_element(buf.begin(), buf.begin() + (W - 1), buf.end(), ranks_before);
      threshold = buf[static_cast<size_t>(W - 1)].score;
      buf.resize(static_cast<size_t>(W));
    }
  };
  for (LiveBeam& lb : beams) {
    if (have_w && lb.best < threshold) break;  // sorted: no later beam can contribute either
    const float* row = a.logits + b * a.ld_b + lb.w * a.ld_w;
    if (a.normalize == BeamNormalize::kFull) {
      if (have_w) {  // a finer check before paying for the log-sum-exp over the whole row
        bool any = false;
        for (int64_t e = lb.lo; e < lb.hi && !any; ++e) {
          const float x = row[a.child_tokens[e]];
          any = lb.bs + (x - lb.lse_bound) >= threshold && node_of(e) >= 0;
        }
        if (!any) continue;
      }
      lb.lse = log_sum_exp(lb.max, sum_exp(row, a.k, lb.max));
    }
    const float lse = lb.lse;
    for (int64_t e = lb.lo; e < lb.hi; ++e) {
      const int64_t tok = a.child_tokens[e];
      const float x = row[tok];
      const float score = normalized ? lb.bs + (x - lse) : lb.bs + x;
      if (!(score >= threshold) || !(score > -kInf)) continue;
      const int64_t c = node_of(e);
      if (c < 0) continue;
      accept(score, lb.w, tok, c);
    }
  }

  if (buf.empty() && !a.pad_empty)
    throw std::invalid_argument(
        "request " + std::to_string(b) +
        " has no valid continuation: no live beam has a child in the trie that is allowed and "
        "has a finite score (pass on_empty='pad' to get padding beams instead)");
  if (static_cast<int64_t>(buf.size()) > W) {
    std::nth_element(buf.begin(), buf.begin() + (W - 1), buf.end(), ranks_before);
    buf.resize(static_cast<size_t>(W));
  }
  std::sort(buf.begin(), buf.end(), ranks_before);
  for (int64_t j = 0; j < W; ++j) {
    const int64_t o = b * W + j;
    if (j < static_cast<int64_t>(buf.size())) {
      const Candidate& c = buf[static_cast<size_t>(j)];
      a.out_scores[o] = c.score;
      a.out_parent[o] = static_cast<int64_t>(static_cast<uint32_t>(c.key));
      a.out_token[o] = c.token;
      a.out_state[o] = c.node;
    } else {
      a.out_scores[o] = -kInf;
      a.out_parent[o] = -1;
      a.out_token[o] = -1;
      a.out_state[o] = -1;
    }
  }
}

// Requests [b0, b1) in order, with the memory each will read fetched a few requests ahead:
// child offsets three requests ahead, child lists two ahead, the first logit rows one ahead.
// `b` is left at the request being stepped (the failing one when this throws).
void step_requests(const BeamStepArgs& a, int64_t b0, int64_t b1, std::vector<Candidate>& buf,
                   std::vector<LiveBeam>& beams, std::vector<int64_t>& ranges, int64_t& b) {
  for (int64_t b = b0; b < std::min(b1, b0 + 3); ++b) prefetch_offsets(a, b);
  for (int64_t b = b0; b < std::min(b1, b0 + 2); ++b) prefetch_children(a, b);
  if (b0 < b1) prefetch_rows(a, b0, 0, kRowsAhead);
  for (b = b0; b < b1; ++b) {
    if (b + 3 < b1) prefetch_offsets(a, b + 3);
    if (b + 2 < b1) prefetch_children(a, b + 2);
    if (b + 1 < b1) prefetch_rows(a, b + 1, 0, kRowsAhead);
    step_request(a, b, buf, beams, ranges);
  }
}

}  // namespace

void constrained_beam_step_cpu(const BeamStepArgs& a) {
  if (a.beam_width < 1)
    throw std::invalid_argument("beam_width must be >= 1; got " + std::to_string(a.beam_width));
  if (a.num_nodes < 1) throw std::invalid_argument("the trie must have a root (num_nodes >= 1)");
  // Candidates store parent and token as 32-bit integers.
  if (a.k > INT32_MAX || a.beams_in > INT32_MAX)
    throw std::invalid_argument("logits: at most 2^31 - 1 beams and codes per row");
  if (a.batch <= 0) return;
  // About 16k logits of live beams per chunk, so small steps (and the first step of a search,
  // one live beam per request) stay on the calling thread.
  int64_t live = 0;
  for (int64_t i = 0; i < a.batch * a.beams_in; ++i) live += a.beam_scores[i] != -kInf;
  const int64_t per_request =
      std::max<int64_t>(1, live * std::max<int64_t>(a.k, 1) / std::max<int64_t>(a.batch, 1));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / per_request);
  std::mutex mutex;
  int64_t failed = std::numeric_limits<int64_t>::max();
  std::exception_ptr error;
  auto run = [&](int64_t b0, int64_t b1) {
    std::vector<Candidate> buf;
    std::vector<LiveBeam> beams;
    std::vector<int64_t> ranges;
    buf.reserve(static_cast<size_t>(2 * a.beam_width));
    beams.reserve(static_cast<size_t>(a.beams_in));
    int64_t b = b0;
    try {
      step_requests(a, b0, b1, buf, beams, ranges, b);
    } catch (...) {
      // Report the smallest failing request whatever the thread timing.
      std::lock_guard<std::mutex> lock(mutex);
      if (b < failed) failed = b, error = std::current_exception();
    }
  };
  parallel_for(a.batch, grain, run, /*chunks_per_thread=*/4);
  if (error) std::rethrow_exception(error);
}

}  // namespace sigma_fast
