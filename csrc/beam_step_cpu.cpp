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

// exp(x - m) for x <= m in float32, as 2^t with t = (x - m) * log2(e), split into t = n + f
// with n an integer and |f| <= 1/2: 2^f from a degree-5 minimax polynomial (2.7 ulp), 2^n
// added to its exponent bits. x - m is exact near the maximum (and 0 at it, where the result
// is exactly 1); the rounding of t adds an error that grows with |t| (at most 7 ulp over
// t in [-8, 0], 66 ulp below, where a term weighs < 2^-8 of the maximum's). t is clamped at -125
// (2^-125 cannot change a sum that contains exp(0) = 1) so the exponent stays in range, which
// also maps x = -inf to a negligible positive value. The scalar twin uses std::fma and
// std::nearbyint (round half to even, like the vector rounding), so both give the same bits.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kExpC1 = 6.9314700365e-01f, kExpC2 = 2.4022242427e-01f,
                kExpC3 = 5.5507339537e-02f, kExpC4 = 9.6715139225e-03f,
                kExpC5 = 1.3264719164e-03f;

inline float exp_shifted(float x, float m) {
  float t = (x - m) * kLog2e;
  t = t > -125.0f ? t : -125.0f;
  const float n = std::nearbyint(t);
  const float f = t - n;
  float p = kExpC5;
  p = std::fma(p, f, kExpC4);
  p = std::fma(p, f, kExpC3);
  p = std::fma(p, f, kExpC2);
  p = std::fma(p, f, kExpC1);
  p = std::fma(p, f, 1.0f);
  uint32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<uint32_t>(static_cast<int32_t>(n)) << 23;
  std::memcpy(&p, &bits, sizeof(p));
  return p;
}

// One pass over a row: its maximum and minimum, the sum of its values (for a lower bound of
// the log-sum-exp), and whether it holds NaN or +inf. `bad` is read off the sum (a NaN or +inf
// value makes it NaN or +inf); a finite row whose sum overflows is flagged too, and the caller
// confirms element by element. The sum runs in 4 sets of 8 lanes: each block of 32 values
// adds its h-th group of 8 to set h; after the last whole block, whole groups go to set 0 and
// the rest to lane 0 of set 0. The sets are combined as (s0 + s1) + (s2 + s3), then the lanes
// in order.
struct RowScan {
  float max, min, sum;
  bool bad;
};

constexpr int kSets = 4;

RowScan scan_row_generic(const float* x, int64_t k) {
  float mx[2][kLanes], mn[2][kLanes], sum[kSets][kLanes];
  for (int j = 0; j < kLanes; ++j) {
    for (int h = 0; h < 2; ++h) mx[h][j] = -kInf, mn[h][j] = kInf;
    for (int h = 0; h < kSets; ++h) sum[h][j] = 0.0f;
  }
  auto add = [&](const float* v, int set, int half) {
    for (int j = 0; j < kLanes; ++j) {
      mx[half][j] = v[j] > mx[half][j] ? v[j] : mx[half][j];
      mn[half][j] = v[j] < mn[half][j] ? v[j] : mn[half][j];
      sum[set][j] += v[j];
    }
  };
  int64_t i = 0;
  for (; i + kSets * kLanes <= k; i += kSets * kLanes)
    for (int h = 0; h < kSets; ++h) add(x + i + h * kLanes, h, h & 1);
  for (; i + kLanes <= k; i += kLanes) add(x + i, 0, 0);
  for (int j = 0; i + j < k; ++j) {
    const float v = x[i + j];
    mx[0][0] = v > mx[0][0] ? v : mx[0][0];
    mn[0][0] = v < mn[0][0] ? v : mn[0][0];
    sum[0][0] += v;
  }
  RowScan out{-kInf, kInf, 0.0f, false};
  for (int j = 0; j < kLanes; ++j) {
    const float m = mx[0][j] > mx[1][j] ? mx[0][j] : mx[1][j];
    const float n = mn[0][j] < mn[1][j] ? mn[0][j] : mn[1][j];
    out.max = m > out.max ? m : out.max;
    out.min = n < out.min ? n : out.min;
    out.sum += (sum[0][j] + sum[1][j]) + (sum[2][j] + sum[3][j]);
  }
  out.bad = !(out.sum < kInf);
  return out;
}

// sum_j exp(x[j] - m) for a row maximum m > -inf, in 2 x 8 lanes (groups of 8 alternate
// between the two sets, a last odd group goes to set 0, the tail to lane j of set 0),
// combined as set 0 + set 1, then the lanes pairwise (deterministic).
float sum_exp_generic(const float* x, int64_t k, float m) {
  float acc[2][kLanes];
  for (int j = 0; j < kLanes; ++j) acc[0][j] = acc[1][j] = 0.0f;
  int64_t i = 0;
  for (; i + 2 * kLanes <= k; i += 2 * kLanes)
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < kLanes; ++j) acc[h][j] += exp_shifted(x[i + h * kLanes + j], m);
  for (; i + kLanes <= k; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[0][j] += exp_shifted(x[i + j], m);
  float a[kLanes];
  for (int j = 0; j < kLanes; ++j) a[j] = acc[0][j] + acc[1][j];
  for (int j = 0; i + j < k; ++j) a[j] += exp_shifted(x[i + j], m);
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

#if defined(__x86_64__) || defined(__i386__)
// The same operations as the generic versions, 8 lanes at a time (lane j of a vector is
// lane j of its set), so both agree bitwise.
__attribute__((target("avx2"))) RowScan scan_row_avx2(const float* x, int64_t k) {
  __m256 mx0 = _mm256_set1_ps(-kInf), mx1 = mx0, mn0 = _mm256_set1_ps(kInf), mn1 = mn0;
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + kSets * kLanes <= k; i += kSets * kLanes) {
    const __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + kLanes);
    const __m256 v2 = _mm256_loadu_ps(x + i + 2 * kLanes);
    const __m256 v3 = _mm256_loadu_ps(x + i + 3 * kLanes);
    // _mm256_max_ps(v, m) is v > m ? v : m, as in the generic loop (min likewise).
    mx0 = _mm256_max_ps(v0, mx0), mn0 = _mm256_min_ps(v0, mn0), s0 = _mm256_add_ps(s0, v0);
    mx1 = _mm256_max_ps(v1, mx1), mn1 = _mm256_min_ps(v1, mn1), s1 = _mm256_add_ps(s1, v1);
    mx0 = _mm256_max_ps(v2, mx0), mn0 = _mm256_min_ps(v2, mn0), s2 = _mm256_add_ps(s2, v2);
    mx1 = _mm256_max_ps(v3, mx1), mn1 = _mm256_min_ps(v3, mn1), s3 = _mm256_add_ps(s3, v3);
  }
  for (; i + kLanes <= k; i += kLanes) {
    const __m256 v = _mm256_loadu_ps(x + i);
    mx0 = _mm256_max_ps(v, mx0), mn0 = _mm256_min_ps(v, mn0), s0 = _mm256_add_ps(s0, v);
  }
  alignas(32) float m0[kLanes], m1[kLanes], n0[kLanes], n1[kLanes], s[kSets][kLanes];
  _mm256_store_ps(m0, mx0), _mm256_store_ps(m1, mx1);
  _mm256_store_ps(n0, mn0), _mm256_store_ps(n1, mn1);
  _mm256_store_ps(s[0], s0), _mm256_store_ps(s[1], s1);
  _mm256_store_ps(s[2], s2), _mm256_store_ps(s[3], s3);
  for (int j = 0; i + j < k; ++j) {
    const float v = x[i + j];
    m0[0] = v > m0[0] ? v : m0[0];
    n0[0] = v < n0[0] ? v : n0[0];
    s[0][0] += v;
  }
  RowScan out{-kInf, kInf, 0.0f, false};
  for (int j = 0; j < kLanes; ++j) {
    const float m = m0[j] > m1[j] ? m0[j] : m1[j];
    const float n = n0[j] < n1[j] ? n0[j] : n1[j];
    out.max = m > out.max ? m : out.max;
    out.min = n < out.min ? n : out.min;
    out.sum += (s[0][j] + s[1][j]) + (s[2][j] + s[3][j]);
  }
  out.bad = !(out.sum < kInf);
  return out;
}

__attribute__((target("avx2,fma"))) inline __m256 exp_shifted8(__m256 x, __m256 m) {
  __m256 t = _mm256_mul_ps(_mm256_sub_ps(x, m), _mm256_set1_ps(kLog2e));
  t = _mm256_max_ps(t, _mm256_set1_ps(-125.0f));  // t > -125 ? t : -125 (no NaN here)
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(kExpC5);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpC4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpC3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpC2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpC1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i scale = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), scale));
}

__attribute__((target("avx2,fma"))) float sum_exp_avx2(const float* x, int64_t k, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 2 * kLanes <= k; i += 2 * kLanes) {
    acc0 = _mm256_add_ps(acc0, exp_shifted8(_mm256_loadu_ps(x + i), mv));
    acc1 = _mm256_add_ps(acc1, exp_shifted8(_mm256_loadu_ps(x + i + kLanes), mv));
  }
  for (; i + kLanes <= k; i += kLanes)
    acc0 = _mm256_add_ps(acc0, exp_shifted8(_mm256_loadu_ps(x + i), mv));
  alignas(32) float a[kLanes];
  _mm256_store_ps(a, _mm256_add_ps(acc0, acc1));
  for (int j = 0; i + j < k; ++j) a[j] += exp_shifted(x[i + j], m);
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

// log(sum exp(x)) given the maximum m and sum = sum exp(x - m); -inf when every value is
// -inf. The maximum's own term is exactly 1, so sum >= 1 and lse >= m: every log-softmax value
// is <= 0 (the step prunes beams with that bound).
inline float log_sum_exp(float m, float sum) {
  return m == -kInf ? -kInf : m + std::log(sum);
}

// A lower bound of the row's computed log-sum-exp, for skipping rows that cannot contribute:
// lse >= max (exactly, see log_sum_exp) and lse >= log K + mean(x) (Jensen), the latter
// lowered by a margin far above the float32 rounding of both sides: the sum of a row (and
// the sum of its exps) errs by at most ~(K / 32 + 10) ulp of K * max|x| (resp. of the sum),
// so the margin grows with K.
inline float lse_lower_bound(const RowScan& scan, int64_t k, double log_k) {
  const double max_abs = std::max(std::fabs(static_cast<double>(scan.max)),
                                  std::fabs(static_cast<double>(scan.min)));
  if (k == 0 || !(scan.sum > -kInf) || !(max_abs < kInf)) return scan.max;
  const double mean = static_cast<double>(scan.sum) / static_cast<double>(k);
  const double jensen = log_k + mean;
  const double margin =
      (1e-3 + 1e-7 * static_cast<double>(k)) * (1.0 + std::fabs(jensen) + max_abs);
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

// Per-thread buffers of step_request, reused across its requests.
struct Scratch {
  std::vector<Candidate> buf;   // accepted candidates
  std::vector<LiveBeam> beams;  // the request's live beams, in beam order
  std::vector<uint64_t> order;  // their visiting order (bound, index) keys
  std::vector<int64_t> ranges;  // child ranges of the request's beams
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
      if (a.allowed) __builtin_prefetch(a.child_nodes + e);
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
void step_request(const BeamStepArgs& a, int64_t b, Scratch& scratch) {
  std::vector<Candidate>& buf = scratch.buf;
  std::vector<LiveBeam>& beams = scratch.beams;
  const int64_t W = a.beam_width;
  const RanksBefore ranks_before;
  const uint8_t* allowed = a.allowed ? a.allowed + b * a.ld_allowed : nullptr;
  const bool normalized = a.normalize != BeamNormalize::kNone;
  const double log_k = a.k > 0 ? std::log(static_cast<double>(a.k)) : 0.0;
  buf.clear();
  beams.clear();

  // Node of slot e, or -1 if not allowed. child_nodes is read only where a node is needed: for
  // the mask's test and for the accepted candidates' outputs (each read is range-checked), so
  // without a mask only the visited beams' lists are fetched, which saves a cache miss per
  // beam for the others.
  auto node_of = [&](int64_t e) -> int64_t {
    const int64_t c = a.child_nodes[e];
    if (c < 0 || c >= a.num_nodes)
      throw std::out_of_range("corrupt trie: child_nodes[" + std::to_string(e) + "] = " +
                              std::to_string(c));
    return allowed && !allowed[c] ? -1 : c;
  };

  // 0. The live beams' child ranges, read in a loop of independent loads (so their cache misses
  // overlap instead of waiting on each other between row scans), then their child lists
  // requested. States are checked here only to stay in bounds; 1. reports bad ones in order.
  scratch.ranges.resize(static_cast<size_t>(2 * a.beams_in));
  int64_t* range = scratch.ranges.data();
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
    if (allowed) __builtin_prefetch(a.child_nodes + lo);
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
    if (scan.bad) {  // NaN or +inf, or a finite row whose sum overflowed: look
      int64_t i = 0;
      while (i < a.k && row[i] < kInf) ++i;
      if (i < a.k)
        throw std::invalid_argument("logits must not be NaN or +inf; got " +
                                    std::to_string(row[i]) + " at " + beam_name(b, w) +
                                    ", index " + std::to_string(i));
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
      if (row[tok] > best_x && (!allowed || node_of(e) >= 0)) best_x = row[tok];
    }
    if (best_x == -kInf) continue;  // no allowed child with a finite logit: no candidate
    LiveBeam lb{w, lo, hi, bs, scan.max, std::numeric_limits<float>::quiet_NaN(), 0.0f, 0.0f};
    if (a.normalize == BeamNormalize::kFull) {
      lb.lse_bound = lse_lower_bound(scan, a.k, log_k);
    } else if (a.normalize == BeamNormalize::kValid) {
      float sum = 0.0f;  // the exact lse over the allowed children is cheap: compute it now
      for (int64_t e = lo; e < hi; ++e)
        if (node_of(e) >= 0) sum += exp_shifted(row[a.child_tokens[e]], best_x);
      lb.lse = lb.lse_bound = log_sum_exp(best_x, sum);
    } else {
      lb.lse = lb.lse_bound = 0.0f;
    }
    lb.best = normalized ? bs + (best_x - lb.lse_bound) : bs + best_x;
    if (lb.best > -kInf) beams.push_back(lb);
  }

  // 2. Best bound first; ties keep beam order: one integer key per live beam (its bound and
  // its index in `beams`, which is in beam order), sorted by insertion (a few dozen keys,
  // often nearly sorted already: the input beams come best first).
  std::vector<uint64_t>& order = scratch.order;
  order.resize(beams.size());
  for (size_t i = 0; i < beams.size(); ++i) order[i] = rank_key(beams[i].best, int64_t(i));
  if (order.size() > 64) {
    std::sort(order.begin(), order.end());
  } else {
    for (size_t i = 1; i < order.size(); ++i) {
      const uint64_t v = order[i];
      size_t j = i;
      for (; j > 0 && order[j - 1] > v; --j) order[j] = order[j - 1];
      order[j] = v;
    }
  }
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
  for (const uint64_t key : order) {
    LiveBeam& lb = beams[static_cast<uint32_t>(key)];
    if (have_w && lb.best < threshold) break;  // sorted: no later beam can contribute either
    const float* row = a.logits + b * a.ld_b + lb.w * a.ld_w;
    if (!allowed) __builtin_prefetch(a.child_nodes + lb.lo);  // read below for the outputs
    if (a.normalize == BeamNormalize::kFull) {
      if (have_w) {  // a finer check before paying for the log-sum-exp over the whole row
        bool any = false;
        for (int64_t e = lb.lo; e < lb.hi && !any; ++e) {
          const float x = row[a.child_tokens[e]];
          any = lb.bs + (x - lb.lse_bound) >= threshold && (!allowed || node_of(e) >= 0);
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
void step_requests(const BeamStepArgs& a, int64_t b0, int64_t b1, Scratch& scratch,
                   int64_t& b) {
  for (int64_t b = b0; b < std::min(b1, b0 + 3); ++b) prefetch_offsets(a, b);
  for (int64_t b = b0; b < std::min(b1, b0 + 2); ++b) prefetch_children(a, b);
  if (b0 < b1) prefetch_rows(a, b0, 0, kRowsAhead);
  for (b = b0; b < b1; ++b) {
    if (b + 3 < b1) prefetch_offsets(a, b + 3);
    if (b + 2 < b1) prefetch_children(a, b + 2);
    if (b + 1 < b1) prefetch_rows(a, b + 1, 0, kRowsAhead);
    step_request(a, b, scratch);
  }
}

}  // namespace

void constrained_beam_step_cpu(const BeamStepArgs& a) {
  check_beam_step_args(a);
  // Candidates store parent and token as 32-bit integers.
  if (a.k > INT32_MAX || a.beams_in > INT32_MAX)
    throw std::invalid_argument("logits: at most 2^31 - 1 beams and codes per row");
  if (a.batch <= 0) return;
  // About 8k logits of live beams per chunk: small steps stay on the calling thread (e.g. the
  // first step of a search, one live beam per request, up to 32 requests of 256 codes), and
  // steps of a few thousand rows split into chunks of one or two requests for balance.
  int64_t live = 0;
  for (int64_t i = 0; i < a.batch * a.beams_in; ++i) live += a.beam_scores[i] != -kInf;
  const int64_t per_request =
      std::max<int64_t>(1, live * std::max<int64_t>(a.k, 1) / std::max<int64_t>(a.batch, 1));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 13) / per_request);
  std::mutex mutex;
  int64_t failed = std::numeric_limits<int64_t>::max();
  std::exception_ptr error;
  auto run = [&](int64_t b0, int64_t b1) {
    Scratch scratch;
    scratch.buf.reserve(static_cast<size_t>(2 * a.beam_width));
    scratch.beams.reserve(static_cast<size_t>(a.beams_in));
    int64_t b = b0;
    try {
      step_requests(a, b0, b1, scratch, b);
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
