#include "trie_cpu.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <string>

#include "common.h"

namespace sigma_fast {
namespace {

// Stable sort of rows by their codes, lexicographically: LSD counting sort, one pass per level
// from the last one (each pass is stable, so earlier levels end up dominant and equal codes keep
// row order). Needs O(k) counters, so for very wide code ranges it falls back to a comparison
// sort with the same result.
template <class CodeT>
std::vector<int64_t> sort_rows(const CodeT* codes, int64_t n, int64_t levels, int64_t ldc,
                               int64_t k) {
  std::vector<int64_t> perm(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), int64_t{0});
  if (k > std::max<int64_t>(int64_t{1} << 16, 2 * n)) {
    std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) {
      const CodeT* ra = codes + a * ldc;
      const CodeT* rb = codes + b * ldc;
      return std::lexicographical_compare(ra, ra + levels, rb, rb + levels);
    });
    return perm;
  }
  std::vector<int64_t> tmp(static_cast<size_t>(n));
  std::vector<int64_t> start(static_cast<size_t>(k) + 1);
  for (int64_t l = levels - 1; l >= 0; --l) {
    std::fill(start.begin(), start.end(), int64_t{0});
    for (int64_t i = 0; i < n; ++i) ++start[static_cast<size_t>(codes[i * ldc + l]) + 1];
    if (start[static_cast<size_t>(codes[l]) + 1] == n) continue;  // one value: order unchanged
    std::partial_sum(start.begin(), start.end(), start.begin());
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = perm[i];
      tmp[static_cast<size_t>(start[static_cast<size_t>(codes[r * ldc + l])]++)] = r;
    }
    perm.swap(tmp);
  }
  return perm;
}

// Word-level "is any bit set in [b, e)" over a bitset with prefix counts of set bits per word.
struct PackedMask {
  std::vector<uint64_t> words;
  std::vector<int64_t> before;  // set bits in words[0 .. w)

  bool any(int64_t b, int64_t e) const {
    if (b >= e) return false;
    const int64_t wb = b >> 6, we = (e - 1) >> 6;
    const uint64_t head = words[wb] >> (b & 63);
    if (wb == we) {
      const int64_t width = e - b;
      return (width == 64 ? head : head & ((uint64_t{1} << width) - 1)) != 0;
    }
    if (head != 0) return true;
    const int64_t tail_bits = ((e - 1) & 63) + 1;
    const uint64_t tail =
        tail_bits == 64 ? words[we] : words[we] & ((uint64_t{1} << tail_bits) - 1);
    return tail != 0 || before[we] > before[wb + 1];
  }
};

inline int popcount64(uint64_t w) {
  w = w - ((w >> 1) & 0x5555555555555555ULL);
  w = (w & 0x3333333333333333ULL) + ((w >> 2) & 0x3333333333333333ULL);
  w = (w + (w >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
  return static_cast<int>((w * 0x0101010101010101ULL) >> 56);
}

void pack_mask(const uint8_t* mask, int64_t id_bound, const int64_t* item_perm, int64_t n,
               PackedMask& pm) {
  const int64_t nw = (n + 63) / 64;
  pm.words.assign(static_cast<size_t>(nw), 0);
  pm.before.assign(static_cast<size_t>(nw) + 1, 0);
  for (int64_t w = 0; w < nw; ++w) {
    const int64_t end = std::min<int64_t>(n, (w + 1) * 64);
    uint64_t word = 0;
    for (int64_t p = w * 64; p < end; ++p) {
      const int64_t id = item_perm[p];
      if (id < 0 || id >= id_bound)
        throw std::out_of_range("trie_allowed_nodes: item_perm[" + std::to_string(p) + "] = " +
                                std::to_string(id) + " is outside the mask's [0, " +
                                std::to_string(id_bound) + ")");
      word |= static_cast<uint64_t>(mask[id] != 0) << (p & 63);
    }
    pm.words[w] = word;
    pm.before[w + 1] = pm.before[w] + popcount64(word);
  }
}

void mark_nodes(const PackedMask& pm, int64_t n, const int64_t* item_begin,
                const int64_t* item_end, int64_t v0, int64_t v1, uint8_t* out) {
  for (int64_t v = v0; v < v1; ++v) {
    const int64_t b = item_begin[v], e = item_end[v];
    if (b < 0 || b > e || e > n)
      throw std::out_of_range("trie_allowed_nodes: node " + std::to_string(v) +
                              " has item range [" + std::to_string(b) + ", " + std::to_string(e) +
                              ") outside [0, " + std::to_string(n) + "]");
    out[v] = pm.any(b, e) ? 1 : 0;
  }
}

}  // namespace

template <class CodeT>
TrieArrays trie_build_cpu(const CodeT* codes, int64_t n, int64_t levels, int64_t ldc, int64_t k) {
  require(n >= 1, "trie_build: codes must have at least one row; got " + std::to_string(n));
  require(levels >= 1,
          "trie_build: codes must have at least one level; got " + std::to_string(levels));
  require(k >= 1, "trie_build: codebook_size must be >= 1; got " + std::to_string(k));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t l = 0; l < levels; ++l) {
      const int64_t c = static_cast<int64_t>(codes[i * ldc + l]);
      if (c < 0 || c >= k)
        throw std::out_of_range("trie_build: code " + std::to_string(c) + " at row " +
                                std::to_string(i) + ", level " + std::to_string(l) +
                                " is outside [0, " + std::to_string(k) + ")");
    }

  TrieArrays t;
  t.num_items = n;
  t.num_levels = levels;
  t.codebook_size = k;
  t.item_perm = sort_rows(codes, n, levels, ldc, k);
  const int64_t* perm = t.item_perm.data();

  // first[s]: the first level where sorted row s differs from row s - 1 (0 for s = 0, `levels`
  // for a repeated code). Row s opens one new node at each depth first[s] + 1 .. levels.
  std::vector<int32_t> first(static_cast<size_t>(n), 0);
  std::vector<int64_t> opened_at(static_cast<size_t>(levels) + 1, 0);
  for (int64_t s = 0; s < n; ++s) {
    int64_t f = 0;
    if (s > 0) {
      const CodeT* a = codes + perm[s - 1] * ldc;
      const CodeT* b = codes + perm[s] * ldc;
      while (f < levels && a[f] == b[f]) ++f;
    }
    first[s] = static_cast<int32_t>(f);
    ++opened_at[f];
  }
  t.level_offsets.assign(static_cast<size_t>(levels) + 2, 0);
  t.level_offsets[1] = 1;
  int64_t opened = 0;  // rows that open a node at depth d: those with first <= d - 1
  for (int64_t d = 1; d <= levels; ++d) {
    opened += opened_at[d - 1];
    t.level_offsets[d + 1] = t.level_offsets[d] + opened;
  }
  const int64_t nodes = t.level_offsets[levels + 1];
  t.num_nodes = nodes;

  t.node_parent.assign(static_cast<size_t>(nodes), -1);
  t.item_begin.assign(static_cast<size_t>(nodes), 0);
  t.item_end.assign(static_cast<size_t>(nodes), n);
  t.child_tokens.assign(static_cast<size_t>(nodes - 1), 0);
  std::vector<int64_t> num_children(static_cast<size_t>(nodes), 0);
  std::vector<int64_t> next_id(t.level_offsets.begin(), t.level_offsets.end() - 1);
  std::vector<int64_t> cur(static_cast<size_t>(levels) + 1, -1);  // open node per depth
  cur[0] = 0;
  for (int64_t s = 0; s < n; ++s) {
    const CodeT* row = codes + perm[s] * ldc;
    for (int64_t l = first[s]; l < levels; ++l) {
      const int64_t d = l + 1, id = next_id[d]++, parent = cur[d - 1];
      if (cur[d] >= 0) t.item_end[cur[d]] = s;
      cur[d] = id;
      t.node_parent[id] = parent;
      t.item_begin[id] = s;
      t.child_tokens[id - 1] = static_cast<int64_t>(row[l]);
      ++num_children[parent];
    }
  }
  t.child_offsets.assign(static_cast<size_t>(nodes) + 1, 0);
  std::partial_sum(num_children.begin(), num_children.end(), t.child_offsets.begin() + 1);
  t.child_nodes.resize(static_cast<size_t>(nodes - 1));
  std::iota(t.child_nodes.begin(), t.child_nodes.end(), int64_t{1});
  t.root_children.assign(static_cast<size_t>(k), -1);
  for (int64_t e = t.child_offsets[0]; e < t.child_offsets[1]; ++e)
    t.root_children[t.child_tokens[e]] = t.child_nodes[e];
  return t;
}

template <class TokT>
void trie_walk_cpu(const TokT* tokens, int64_t b, int64_t len, int64_t ldt,
                   const int64_t* child_offsets, const int64_t* child_tokens,
                   const int64_t* child_nodes, int64_t num_nodes, int64_t* out) {
  require(num_nodes >= 1, "trie_walk: the trie must have a root");
  const int64_t slots = child_offsets[num_nodes];
  parallel_for(b, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      int64_t node = 0;
      for (int64_t j = 0; j < len && node >= 0; ++j) {
        const int64_t tok = static_cast<int64_t>(tokens[i * ldt + j]);
        int64_t lo = child_offsets[node], hi = child_offsets[node + 1];
        if (lo < 0 || lo > hi || hi > slots)
          throw std::out_of_range("trie_walk: corrupt child_offsets at node " +
                                  std::to_string(node));
        const int64_t* it = std::lower_bound(child_tokens + lo, child_tokens + hi, tok);
        if (it == child_tokens + hi || *it != tok) {
          node = -1;
          break;
        }
        node = child_nodes[it - child_tokens];
        if (node < 0 || node >= num_nodes)
          throw std::out_of_range("trie_walk: corrupt child_nodes entry " + std::to_string(node));
      }
      out[i] = node;
    }
  });
}

void trie_allowed_nodes_cpu(const uint8_t* masks, int64_t m, int64_t ldm, int64_t id_bound,
                            const int64_t* item_perm, int64_t n, const int64_t* item_begin,
                            const int64_t* item_end, int64_t num_nodes, uint8_t* out) {
  if (m <= 0 || num_nodes <= 0) return;
  if (m >= get_num_threads()) {
    parallel_for(m, 1, [&](int64_t i0, int64_t i1) {
      PackedMask pm;
      for (int64_t i = i0; i < i1; ++i) {
        pack_mask(masks + i * ldm, id_bound, item_perm, n, pm);
        mark_nodes(pm, n, item_begin, item_end, 0, num_nodes, out + i * num_nodes);
      }
    });
    return;
  }
  PackedMask pm;
  for (int64_t i = 0; i < m; ++i) {
    pack_mask(masks + i * ldm, id_bound, item_perm, n, pm);
    parallel_for(num_nodes, 1 << 16, [&](int64_t v0, int64_t v1) {
      mark_nodes(pm, n, item_begin, item_end, v0, v1, out + i * num_nodes);
    });
  }
}

template TrieArrays trie_build_cpu<int32_t>(const int32_t*, int64_t, int64_t, int64_t, int64_t);
template TrieArrays trie_build_cpu<int64_t>(const int64_t*, int64_t, int64_t, int64_t, int64_t);
template void trie_walk_cpu<int32_t>(const int32_t*, int64_t, int64_t, int64_t, const int64_t*,
                                     const int64_t*, const int64_t*, int64_t, int64_t*);
template void trie_walk_cpu<int64_t>(const int64_t*, int64_t, int64_t, int64_t, const int64_t*,
                                     const int64_t*, const int64_t*, int64_t, int64_t*);

}  // namespace sigma_fast
