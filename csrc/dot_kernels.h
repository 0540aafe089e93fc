// Dense inner products of row blocks against a packed matrix: the compute core shared by the
// quantizer and the retrieval ops. Every output element is one fused multiply-add chain over
// t = 0..d-1 in order, whatever the row's position in a tile, so results do not depend on how
// rows are blocked or threaded.
#pragma once

#include <cstdint>

namespace sigma_fast {

constexpr int64_t kPanel = 16;  // columns per packed panel

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Number of floats pack_panels writes for a matrix of `rows` rows and width d.
inline int64_t packed_floats(int64_t rows, int64_t d) { return round_up(rows, kPanel) * d; }

// Packs B (rows x d, row stride ldb) into panels of kPanel rows: panel p stores, for every
// t < d, the kPanel values B[p*kPanel + j][t] contiguously (zero for rows past the end).
void pack_panels(const float* b, int64_t rows, int64_t d, int64_t ldb, float* packed);

// C[i][j] = <A[i], B[j]> for i < m and j < npanels * kPanel, where B was packed by pack_panels.
// A has row stride lda, C has row stride ldc (>= npanels * kPanel).
void dot_panels(const float* a, int64_t m, int64_t lda, const float* packed, int64_t npanels,
                int64_t d, float* c, int64_t ldc);

// Which micro-kernel dot_panels uses on this machine ("avx2-fma" or "generic").
const char* dot_kernel_name();

}  // namespace sigma_fast
