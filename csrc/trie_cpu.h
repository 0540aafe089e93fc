// Prefix trie over semantic-ID codes on the CPU (torch-free): build, walk, and item-mask ->
// node-validity. The layout of the arrays is in trie.h; semantics:
// python/sigma_fast/reference/trie.py.
#pragma once

#include <cstdint>

#include "trie.h"

namespace sigma_fast {

// Builds the trie of n rows of `levels` codes each (row stride ldc). Every code must lie in
// [0, k); throws std::out_of_range naming the first (row, level) that does not. Cost: a stable
// LSD counting sort of the rows (one pass per level) and two linear passes.
template <class CodeT>
TrieArrays trie_build_cpu(const CodeT* codes, int64_t n, int64_t levels, int64_t ldc, int64_t k);

// Follows each of the b token sequences (length len, row stride ldt) from the root; out[i] is the
// node reached, or -1 where the path does not exist (including tokens outside the trie's range).
template <class TokT>
void trie_walk_cpu(const TokT* tokens, int64_t b, int64_t len, int64_t ldt,
                   const int64_t* child_offsets, const int64_t* child_tokens,
                   const int64_t* child_nodes, int64_t num_nodes, int64_t* out);

// For each of m item masks (row stride ldm, indexed by caller item id in [0, id_bound)):
// out[i * num_nodes + v] = 1 iff at least one allowed item lies below node v, i.e. some sorted
// position p in [item_begin[v], item_end[v]) has mask[item_perm[p]]. The mask is packed into
// 64-bit words in sorted order with prefix popcounts, so each node costs O(1):
// O(N + N/64 + nodes) per mask.
void trie_allowed_nodes_cpu(const uint8_t* masks, int64_t m, int64_t ldm, int64_t id_bound,
                            const int64_t* item_perm, int64_t n, const int64_t* item_begin,
                            const int64_t* item_end, int64_t num_nodes, uint8_t* out);

}  // namespace sigma_fast
