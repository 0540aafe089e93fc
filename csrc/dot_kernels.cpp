#include "dot_kernels.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SIGMA_FAST_X86 1
#endif

namespace sigma_fast {

void pack_panels(const float* b, int64_t rows, int64_t d, int64_t ldb, float* packed) {
  const int64_t npanels = round_up(rows, kPanel) / kPanel;
  for (int64_t p = 0; p < npanels; ++p) {
    float* dst = packed + p * kPanel * d;
    for (int64_t j = 0; j < kPanel; ++j) {
      const int64_t row = p * kPanel + j;
      if (row < rows) {
        const float* src = b + row * ldb;
        for (int64_t t = 0; t < d; ++t) dst[t * kPanel + j] = src[t];
      } else {
        for (int64_t t = 0; t < d; ++t) dst[t * kPanel + j] = 0.0f;
      }
    }
  }
}

namespace {

constexpr int kRows = 6;  // rows per micro-tile

// Rows past m are clamped to the last valid row (computed, never stored), so a tile always
// runs the same instruction sequence.
void tile_generic(const float* const* arow, int mr, const float* panel, int64_t d, float* c,
                  int64_t ldc) {
  float acc[kRows][kPanel] = {};
  for (int64_t t = 0; t < d; ++t) {
    const float* bt = panel + t * kPanel;
    for (int r = 0; r < kRows; ++r) {
      const float av = arow[r][t];
      for (int j = 0; j < kPanel; ++j) acc[r][j] += av * bt[j];
    }
  }
  for (int r = 0; r < mr; ++r) std::memcpy(c + r * ldc, acc[r], sizeof(float) * kPanel);
}

#ifdef SIGMA_FAST_X86
__attribute__((target("avx2,fma"))) void tile_avx2(const float* const* arow, int mr,
                                                   const float* panel, int64_t d, float* c,
                                                   int64_t ldc) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
  __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
  __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
  __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  const float *a0 = arow[0], *a1 = arow[1], *a2 = arow[2], *a3 = arow[3], *a4 = arow[4],
              *a5 = arow[5];
  for (int64_t t = 0; t < d; ++t) {
    const __m256 b0 = _mm256_loadu_ps(panel + t * kPanel);
    const __m256 b1 = _mm256_loadu_ps(panel + t * kPanel + 8);
    __m256 av = _mm256_broadcast_ss(a0 + t);
    c00 = _mm256_fmadd_ps(av, b0, c00);
    c01 = _mm256_fmadd_ps(av, b1, c01);
    av = _mm256_broadcast_ss(a1 + t);
    c10 = _mm256_fmadd_ps(av, b0, c10);
    c11 = _mm256_fmadd_ps(av, b1, c11);
    av = _mm256_broadcast_ss(a2 + t);
    c20 = _mm256_fmadd_ps(av, b0, c20);
    c21 = _mm256_fmadd_ps(av, b1, c21);
    av = _mm256_broadcast_ss(a3 + t);
    c30 = _mm256_fmadd_ps(av, b0, c30);
    c31 = _mm256_fmadd_ps(av, b1, c31);
    av = _mm256_broadcast_ss(a4 + t);
    c40 = _mm256_fmadd_ps(av, b0, c40);
    c41 = _mm256_fmadd_ps(av, b1, c41);
    av = _mm256_broadcast_ss(a5 + t);
    c50 = _mm256_fmadd_ps(av, b0, c50);
    c51 = _mm256_fmadd_ps(av, b1, c51);
  }
  const __m256 acc[kRows][2] = {{c00, c01}, {c10, c11}, {c20, c21},
                                {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < mr; ++r) {
    _mm256_storeu_ps(c + r * ldc, acc[r][0]);
    _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
  }
}

bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

using TileFn = void (*)(const float* const*, int, const float*, int64_t, float*, int64_t);

TileFn select_tile() {
#ifdef SIGMA_FAST_X86
  if (cpu_has_avx2_fma()) return tile_avx2;
#endif
  return tile_generic;
}

}  // namespace

const char* dot_kernel_name() {
#ifdef SIGMA_FAST_X86
  if (cpu_has_avx2_fma()) return "avx2-fma";
#endif
  return "generic";
}

void dot_panels(const float* a, int64_t m, int64_t lda, const float* packed, int64_t npanels,
                int64_t d, float* c, int64_t ldc) {
  if (m <= 0 || npanels <= 0) return;
  static const TileFn tile = select_tile();
  // Panels outer, row tiles inner: one packed panel (16 * d floats) stays in L1 while the
  // block's rows stream from L2; each row cache line then serves 16 inner-product steps.
  for (int64_t p = 0; p < npanels; ++p) {
    const float* panel = packed + p * kPanel * d;
    for (int64_t i0 = 0; i0 < m; i0 += kRows) {
      const int mr = static_cast<int>(std::min<int64_t>(kRows, m - i0));
      const float* rows[kRows];
      for (int r = 0; r < kRows; ++r) rows[r] = a + (i0 + std::min(r, mr - 1)) * lda;
      tile(rows, mr, panel, d, c + i0 * ldc + p * kPanel, ldc);
    }
  }
}

}  // namespace sigma_fast
