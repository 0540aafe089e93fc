// Prefix trie over semantic-ID codes (trie_build / trie_walk / trie_allowed_nodes): the layout
// of its arrays, which every backend reads (the constrained beam step walks the CSR child lists
// on the CPU, in CUDA and in Triton). Torch-free and CUDA-free. The builder is trie_cpu.h;
// semantics: python/sigma_fast/reference/trie.py.
//
// Layout (all int64). Rows are sorted by code (stable, so equal codes keep row order); node ids
// are assigned level by level: root = 0, then the depth-1 nodes in token order, then the depth-2
// nodes in (parent, token) order, ... Consequently the children of every node are consecutive
// ids, and child slot e (CSR index) holds node e + 1.
//   level_offsets [L + 2]      nodes at depth d are [level_offsets[d], level_offsets[d + 1])
//   child_offsets [nodes + 1]  children of node n: CSR slots [child_offsets[n], child_offsets[n+1])
//   child_tokens  [nodes - 1]  token of slot e (ascending within each node)
//   child_nodes   [nodes - 1]  node of slot e (= e + 1)
//   node_parent   [nodes]      parent of each node (-1 for the root)
//   item_begin/item_end [nodes]  the items below a node are sorted positions [begin, end)
//   item_perm     [N]          sorted position -> row of the input codes
//   root_children [K]          dense first-level lookup: node of token k under the root, or -1
#pragma once

#include <cstdint>
#include <vector>

namespace sigma_fast {

// The arrays above, as the builder returns them.
struct TrieArrays {
  int64_t num_items = 0, num_levels = 0, codebook_size = 0, num_nodes = 0;
  std::vector<int64_t> level_offsets, child_offsets, child_tokens, child_nodes, node_parent,
      item_begin, item_end, item_perm, root_children;
};

}  // namespace sigma_fast
