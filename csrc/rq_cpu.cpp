#include "rq_cpu.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common.h"
#include "dot_kernels.h"

// The encode loops are compiled twice on x86-64 (AVX2 and baseline), chosen at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define SIGMA_FAST_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SIGMA_FAST_CLONES
#endif

namespace sigma_fast {
namespace {

// Sum of squares in double with eight independent accumulators (a fixed order, so the result
// is deterministic; the independent chains let the compiler vectorize and pipeline it).
inline double squared_norm64(const float* v, int64_t d) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t t = 0;
  for (; t + 8 <= d; t += 8)
    for (int j = 0; j < 8; ++j) acc[j] += static_cast<double>(v[t + j]) * v[t + j];
  for (; t < d; ++t) acc[0] += static_cast<double>(v[t]) * v[t];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

inline float squared_norm(const float* v, int64_t d) {
  return static_cast<float>(squared_norm64(v, d));
}

// Codebooks packed once per call, with codeword norms for ||r||^2 - 2<r,c> + ||c||^2.
struct PackedCodebooks {
  int64_t levels, k, d, kpad;
  std::vector<float> panels;  // levels x packed_floats(k, d)
  std::vector<float> norms;   // levels x kpad

  // Cross tables for beam search: cross(p, l)[c][j] = <C_p[c], C_l[j]> for p < l, so that
  // <r, C_l[j]> = <x, C_l[j]> - sum_{p<l} cross(p, l)[code_p][j] needs no residual vectors.
  std::vector<float> cross;  // levels x levels x k x kpad (only p < l filled)

  PackedCodebooks(const float* cb, int64_t levels_, int64_t k_, int64_t d_, bool with_cross)
      : levels(levels_), k(k_), d(d_), kpad(round_up(k_, kPanel)) {
    panels.resize(static_cast<size_t>(levels * kpad * d));
    norms.assign(static_cast<size_t>(levels * kpad), 0.0f);
    for (int64_t l = 0; l < levels; ++l) {
      pack_panels(cb + l * k * d, k, d, d, panels.data() + l * kpad * d);
      for (int64_t j = 0; j < k; ++j) norms[l * kpad + j] = squared_norm(cb + (l * k + j) * d, d);
    }
    if (with_cross) {
      cross.resize(static_cast<size_t>(levels * levels * k * kpad));
      for (int64_t l = 1; l < levels; ++l)
        for (int64_t p = 0; p < l; ++p)
          dot_panels(cb + p * k * d, k, d, panel(l), kpad / kPanel, d,
                     cross.data() + (p * levels + l) * k * kpad, kpad);
    }
  }
  const float* panel(int64_t l) const { return panels.data() + l * kpad * d; }
  const float* norm(int64_t l) const { return norms.data() + l * kpad; }
  const float* cross_row(int64_t p, int64_t l, int64_t c) const {
    return cross.data() + ((p * levels + l) * k + c) * kpad;
  }
};

// Cross tables are used for beam search when they fit this budget (the choice depends only on
// the codebook shape, never on n, so a row gets the same code in any batch).
constexpr double kCrossBudgetBytes = 64.0 * (1 << 20);

bool use_cross_tables(int64_t levels, int64_t k, int64_t beam) {
  const double bytes = 4.0 * levels * (levels - 1) / 2 * k * round_up(k, kPanel);
  return beam > 1 && levels > 1 && bytes <= kCrossBudgetBytes;
}

// Per-thread scratch for a block of vectors; beams of vector i live in rows i*nb .. i*nb+nb-1.
struct Workspace {
  std::vector<float> res, res_next, dots, score, cand;
  // Beam search: each beam's residual error relative to a per-vector constant (see
  // encode_block / encode_block_cross), so that the huge ||r||^2 of inputs much larger than
  // the codewords does not swamp the differences between candidates in float32.
  std::vector<double> rnorm, rnorm_next;
  std::vector<int64_t> prefix, prefix_next;
  std::vector<int32_t> order;
};


// Candidate distance with NaN mapped to +inf so the orderings below stay strict-weak.
inline float candidate_score(float rnorm, float cnorm, float dot) {
  float s = rnorm + cnorm - 2.0f * dot;
  return s == s ? s : std::numeric_limits<float>::infinity();
}

// Minimum of v[0..n) (no NaN), with eight independent lanes so it vectorizes.
inline float min_value(const float* v, int64_t n) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  float lane[8] = {inf, inf, inf, inf, inf, inf, inf, inf};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int t = 0; t < 8; ++t) lane[t] = v[j + t] < lane[t] ? v[j + t] : lane[t];
  for (; j < n; ++j) lane[0] = v[j] < lane[0] ? v[j] : lane[0];
  float lo = lane[0];
  for (int t = 1; t < 8; ++t) lo = lane[t] < lo ? lane[t] : lo;
  return lo;
}

constexpr int64_t kChunk = 16;  // candidates screened together against the worst kept beam

// The `cap` best candidates of one vector at one level, sorted best first by (score, code
// tuple), where candidate b*k + j extends beam b (whose codes are prefix[b*levels ..]) by j.
struct TopBeams {
  int64_t cap, count = 0;
  const int64_t* prefix;
  int64_t levels, level, k;
  float* score;   // [cap]
  int32_t* cand;  // [cap]

  TopBeams(int64_t cap_, const int64_t* prefix_, int64_t levels_, int64_t level_, int64_t k_,
           float* score_, int32_t* cand_)
      : cap(cap_), prefix(prefix_), levels(levels_), level(level_), k(k_), score(score_),
        cand(cand_) {}

  // Strict "better than": lower score, then the lexicographically smaller code tuple.
  bool better(float su, int64_t u, float sv, int64_t v) const {
    if (su != sv) return su < sv;
    const int64_t bu = u / k, bv = v / k;
    if (bu != bv) {
      const int64_t* pu = prefix + bu * levels;
      const int64_t* pv = prefix + bv * levels;
      for (int64_t t = 0; t < level; ++t)
        if (pu[t] != pv[t]) return pu[t] < pv[t];
    }
    return u % k < v % k;
  }

  // Offers the k candidates extending beam b (scores sc[0..k), NaN-free). Most are rejected by
  // one comparison with the worst kept candidate; whole chunks by their minimum.
  void offer(int64_t b, const float* sc) {
    for (int64_t j0 = 0; j0 < k; j0 += kChunk) {
      const int64_t j1 = std::min(k, j0 + kChunk);
      if (count == cap && min_value(sc + j0, j1 - j0) > score[count - 1]) continue;
      for (int64_t j = j0; j < j1; ++j) {
        const float s = sc[j];
        const int64_t c = b * k + j;
        if (count == cap) {
          if (!better(s, c, score[count - 1], cand[count - 1])) continue;
          --count;  // drop the worst
        }
        int64_t pos = count;
        while (pos > 0 && better(s, c, score[pos - 1], cand[pos - 1])) {
          score[pos] = score[pos - 1];
          cand[pos] = cand[pos - 1];
          --pos;
        }
        score[pos] = s;
        cand[pos] = static_cast<int32_t>(c);
        ++count;
      }
    }
  }
};

// Beam search through the cross tables: per vector one row of <x, C_l[j]> for all levels (one
// packed GEMM for the block), then per beam and level only l table rows are subtracted.
SIGMA_FAST_CLONES void encode_block_cross(const float* x, int64_t m, int64_t ldx,
                                          const float* codebooks, const PackedCodebooks& pc,
                                          int64_t beam, int64_t* codes, float* err,
                                          Workspace& ws) {
  const int64_t d = pc.d, k = pc.k, kpad = pc.kpad, levels = pc.levels;
  const int64_t width = levels * kpad;
  ws.dots.resize(static_cast<size_t>(m * width));
  dot_panels(x, m, ldx, pc.panel(0), width / kPanel, d, ws.dots.data(), width);
  ws.prefix.resize(static_cast<size_t>(beam * levels));
  ws.prefix_next.resize(ws.prefix.size());
  ws.rnorm.resize(static_cast<size_t>(beam));
  ws.rnorm_next.resize(ws.rnorm.size());
  ws.score.resize(static_cast<size_t>(beam));
  ws.order.resize(static_cast<size_t>(beam));
  ws.cand.resize(static_cast<size_t>(k));
  ws.res.resize(static_cast<size_t>(kpad + d));
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * ldx;
    const float* xc = &ws.dots[i * width];
    // Scores are errors minus ||x||^2 (the same for every candidate of this vector):
    // ||S + c||^2 - 2<x, S + c> for the code prefix's codeword sum S, whose terms are of the
    // size |x||c|, not |x|^2.
    ws.rnorm[0] = 0.0;
    int64_t nb = 1;
    for (int64_t l = 0; l < levels; ++l) {
      const float* cn = pc.norm(l);
      const int64_t nb_next = std::min(beam, nb * k);
      TopBeams top(nb_next, ws.prefix.data(), levels, l, k, ws.score.data(), ws.order.data());
      float* acc = ws.res.data();
      float* sc = ws.cand.data();
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t* pre = &ws.prefix[b * levels];
        for (int64_t j = 0; j < k; ++j) acc[j] = xc[l * kpad + j];
        for (int64_t p = 0; p < l; ++p) {
          const float* t = pc.cross_row(p, l, pre[p]);
          for (int64_t j = 0; j < k; ++j) acc[j] -= t[j];
        }
        const float rn = static_cast<float>(ws.rnorm[b]);
        for (int64_t j = 0; j < k; ++j) sc[j] = candidate_score(rn, cn[j], acc[j]);
        top.offer(b, sc);
      }
      for (int64_t c = 0; c < nb_next; ++c) {
        const int64_t b = ws.order[c] / k, j = ws.order[c] % k;
        std::memcpy(&ws.prefix_next[c * levels], &ws.prefix[b * levels], sizeof(int64_t) * l);
        ws.prefix_next[c * levels + l] = j;
        ws.rnorm_next[c] = ws.score[c];  // ||r_b - c_j||^2, tracked through the expansion
      }
      std::swap(ws.prefix, ws.prefix_next);
      std::swap(ws.rnorm, ws.rnorm_next);
      nb = nb_next;
    }
    std::memcpy(codes + i * levels, ws.prefix.data(), sizeof(int64_t) * levels);
    if (err) {
      // The reported error is recomputed from the float32 residual, as the reference does.
      float* r = ws.res.data() + kpad;
      std::memcpy(r, xi, sizeof(float) * d);
      for (int64_t l = 0; l < levels; ++l) {
        const float* cw = codebooks + (l * k + ws.prefix[l]) * d;
        for (int64_t t = 0; t < d; ++t) r[t] -= cw[t];
      }
      err[i] = squared_norm(r, d);
    }
  }
}

SIGMA_FAST_CLONES void encode_block(const float* x, int64_t m, int64_t ldx, const float* codebooks,
                  const PackedCodebooks& pc, int64_t beam, int64_t* codes, float* err,
                  Workspace& ws) {
  const int64_t d = pc.d, k = pc.k, kpad = pc.kpad, levels = pc.levels;
  ws.res.resize(static_cast<size_t>(m * beam * d));
  ws.res_next.resize(ws.res.size());
  ws.dots.resize(static_cast<size_t>(m * beam * kpad));
  ws.rnorm.resize(static_cast<size_t>(m * beam));
  ws.rnorm_next.resize(ws.rnorm.size());
  ws.prefix.resize(static_cast<size_t>(m * beam * levels));
  ws.prefix_next.resize(ws.prefix.size());

  for (int64_t i = 0; i < m; ++i) {
    std::memcpy(&ws.res[i * d], x + i * ldx, sizeof(float) * d);
    ws.rnorm[i] = squared_norm64(&ws.res[i * d], d);
  }
  int64_t nb = 1;  // beams per vector at the current level (the same for every vector)
  for (int64_t l = 0; l < levels; ++l) {
    const float* cb = codebooks + l * k * d;
    const float* cn = pc.norm(l);
    const int64_t rows = m * nb;
    dot_panels(ws.res.data(), rows, d, pc.panel(l), kpad / kPanel, d, ws.dots.data(), kpad);
    if (beam == 1) {
      ws.score.resize(static_cast<size_t>(k));
      float* sc = ws.score.data();
      for (int64_t i = 0; i < m; ++i) {
        const float* dot = &ws.dots[i * kpad];
        // Pass 1 (vectorizable): scores with NaN as +inf, and their minimum.
        for (int64_t j = 0; j < k; ++j) sc[j] = candidate_score(0.0f, cn[j], dot[j]);
        const float lo = min_value(sc, k);
        // Pass 2: the first index reaching the minimum (ties keep the smaller index).
        int64_t best = 0;
        while (best < k && sc[best] != lo) ++best;
        if (best == k) best = 0;  // every score +inf
        ws.prefix[i * levels + l] = best;
        float* r = &ws.res[i * d];
        const float* c = cb + best * d;
        for (int64_t t = 0; t < d; ++t) r[t] -= c[t];
      }
      continue;
    }
    const int64_t cands = nb * k;
    const int64_t nb_next = std::min(beam, cands);
    ws.order.resize(static_cast<size_t>(nb_next));
    ws.score.resize(static_cast<size_t>(nb_next));
    ws.cand.resize(static_cast<size_t>(k));
    for (int64_t i = 0; i < m; ++i) {
      TopBeams top(nb_next, &ws.prefix[i * nb * levels], levels, l, k, ws.score.data(),
                   ws.order.data());
      // Each beam's ||r||^2 (double) relative to the vector's smallest one: exactly 0 for a
      // single beam (like greedy, which drops it), and beams whose float32 residuals are equal
      // (inputs so large that codewords vanish in them) tie exactly.
      double base = ws.rnorm[i * nb];
      for (int64_t b = 1; b < nb; ++b) base = std::min(base, ws.rnorm[i * nb + b]);
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t row = i * nb + b;
        const float* dot = &ws.dots[row * kpad];
        const float rn = static_cast<float>(ws.rnorm[row] - base);
        float* sc = ws.cand.data();
        for (int64_t j = 0; j < k; ++j) sc[j] = candidate_score(rn, cn[j], dot[j]);
        top.offer(b, sc);
      }
      const int32_t* kept = ws.order.data();
      for (int64_t c = 0; c < nb_next; ++c) {
        const int64_t b = kept[c] / k, j = kept[c] % k;
        const int64_t src = i * nb + b, dst = i * nb_next + c;
        std::memcpy(&ws.prefix_next[dst * levels], &ws.prefix[src * levels],
                    sizeof(int64_t) * l);
        ws.prefix_next[dst * levels + l] = j;
        const float* r = &ws.res[src * d];
        const float* cw = cb + j * d;
        float* out = &ws.res_next[dst * d];
        for (int64_t t = 0; t < d; ++t) out[t] = r[t] - cw[t];
        ws.rnorm_next[dst] = squared_norm64(out, d);
      }
    }
    std::swap(ws.res, ws.res_next);
    std::swap(ws.rnorm, ws.rnorm_next);
    std::swap(ws.prefix, ws.prefix_next);
    nb = nb_next;
  }
  // Beams are sorted best first, so beam 0 of each vector is the answer.
  for (int64_t i = 0; i < m; ++i) {
    const int64_t row = i * nb;
    std::memcpy(codes + i * levels, &ws.prefix[row * levels], sizeof(int64_t) * levels);
    if (err) err[i] = squared_norm(&ws.res[row * d], d);
  }
}

}  // namespace

void rq_encode_cpu(const float* x, int64_t n, int64_t d, int64_t ldx, const float* codebooks,
                   int64_t levels, int64_t k, int64_t beam_width, int64_t* codes, float* err,
                   RqStrategy strategy) {
  check_rq_encode_sizes(n, d, levels, k, beam_width);
  check_rq_encode_stride(ldx, d);
  // A beam wider than k^levels keeps every partial code at every level, so it gives the same
  // codes as beam k^levels: clamp it (without overflow) before it sizes any buffer.
  int64_t widest = 1;
  for (int64_t l = 0; l < levels && widest < beam_width; ++l)
    widest = widest > beam_width / k ? beam_width : std::min(beam_width, widest * k);
  beam_width = widest;
  // Candidates of one vector are numbered b * k + j in 32 bits (TopBeams::cand).
  if (beam_width > std::numeric_limits<int32_t>::max() / k)
    throw std::invalid_argument("rq_encode: beam_width * k = " + std::to_string(beam_width) +
                                " * " + std::to_string(k) +
                                " candidates per vector exceed 2^31 - 1");
  if (n == 0) return;
  const bool cross = beam_width > 1 && levels > 1 &&
                     (strategy == RqStrategy::kCross ||
                      (strategy == RqStrategy::kAuto && use_cross_tables(levels, k, beam_width)));
  const PackedCodebooks pc(codebooks, levels, k, d, cross);
  // About 192 residual rows per block keeps a block's residuals and dot products in L2.
  const int64_t per_block = cross ? 64 : std::max<int64_t>(1, 192 / beam_width);
  const int64_t blocks = (n + per_block - 1) / per_block;
  const double flops_per_block =
      2.0 * per_block * static_cast<double>(std::min<int64_t>(beam_width, 64)) * levels *
      pc.kpad * d;
  const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(2e6 / flops_per_block));
  parallel_for(blocks, grain, [&](int64_t b0, int64_t b1) {
    Workspace ws;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t v0 = b * per_block, m = std::min(per_block, n - v0);
      if (cross)
        encode_block_cross(x + v0 * ldx, m, ldx, codebooks, pc, beam_width, codes + v0 * levels,
                           err ? err + v0 : nullptr, ws);
      else
        encode_block(x + v0 * ldx, m, ldx, codebooks, pc, beam_width, codes + v0 * levels,
                     err ? err + v0 : nullptr, ws);
    }
  });
}

namespace {

// out = ((0 + w_0) + w_1) + ... in level order (the reference's order); 0 + w_0 turns -0.0 into
// +0.0 exactly as the reference's zero-initialised sum does.
void sum_codewords(const float* const* words, int64_t levels, int64_t d, float* out) {
  if (levels == 0) {
    std::fill(out, out + d, 0.0f);
    return;
  }
  for (int64_t t = 0; t < d; ++t) {
    float acc = 0.0f + words[0][t];
    for (int64_t l = 1; l < levels; ++l) acc += words[l][t];
    out[t] = acc;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same sums eight lanes at a time, each output written once (the partial sums stay in a
// register); `stream` writes with non-temporal stores (out must be 32-byte aligned).
__attribute__((target("avx2"))) void sum_codewords_avx2(const float* const* words,
                                                        int64_t levels, int64_t d, float* out,
                                                        bool stream) {
  if (levels == 0) {
    std::fill(out, out + d, 0.0f);
    return;
  }
  int64_t t = 0;
  for (; t + 8 <= d; t += 8) {
    __m256 acc = _mm256_add_ps(_mm256_setzero_ps(), _mm256_loadu_ps(words[0] + t));
    for (int64_t l = 1; l < levels; ++l) acc = _mm256_add_ps(acc, _mm256_loadu_ps(words[l] + t));
    if (stream)
      _mm256_stream_ps(out + t, acc);
    else
      _mm256_storeu_ps(out + t, acc);
  }
  for (; t < d; ++t) {
    float acc = 0.0f + words[0][t];
    for (int64_t l = 1; l < levels; ++l) acc += words[l][t];
    out[t] = acc;
  }
}

bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
}
#endif

// Streaming stores pay off only when the output would not stay in cache anyway.
constexpr int64_t kStreamBytes = int64_t{8} << 20;

}  // namespace

template <class CodeT>
void rq_decode_cpu(const CodeT* codes, int64_t n, int64_t ldc, int64_t levels,
                   const float* codebooks, int64_t k, int64_t d, float* out, int64_t ldo) {
  check_rq_decode_sizes(n, d, levels, k, ldc);
  if (ldo < d)
    throw std::invalid_argument("rq_decode: row stride of out must be >= d; got ldo=" +
                                std::to_string(ldo) + " d=" + std::to_string(d));
#if defined(__x86_64__) && defined(__GNUC__)
  const bool avx2 = cpu_has_avx2();
  const bool stream = avx2 && n * d * static_cast<int64_t>(sizeof(float)) >= kStreamBytes &&
                      d % 8 == 0 && ldo % 8 == 0 &&
                      reinterpret_cast<std::uintptr_t>(out) % 32 == 0;
#endif
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, (levels + 1) * d));
  parallel_for(n, grain, [&](int64_t i0, int64_t i1) {
    std::vector<const float*> words(static_cast<size_t>(levels));
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t l = 0; l < levels; ++l) {
        const int64_t c = static_cast<int64_t>(codes[i * ldc + l]);
        if (c < 0 || c >= k)
          throw std::out_of_range("rq_decode: code " + std::to_string(c) + " at row " +
                                  std::to_string(i) + ", level " + std::to_string(l) +
                                  " is outside [0, " + std::to_string(k) + ")");
        words[l] = codebooks + (l * k + c) * d;
      }
#if defined(__x86_64__) && defined(__GNUC__)
      if (avx2) {
        sum_codewords_avx2(words.data(), levels, d, out + i * ldo, stream);
        continue;
      }
#endif
      sum_codewords(words.data(), levels, d, out + i * ldo);
    }
#if defined(__x86_64__) && defined(__GNUC__)
    if (stream) _mm_sfence();  // streamed rows are visible before the call returns
#endif
  });
}

template void rq_decode_cpu<int32_t>(const int32_t*, int64_t, int64_t, int64_t, const float*,
                                     int64_t, int64_t, float*, int64_t);
template void rq_decode_cpu<int64_t>(const int64_t*, int64_t, int64_t, int64_t, const float*,
                                     int64_t, int64_t, float*, int64_t);

}  // namespace sigma_fast
