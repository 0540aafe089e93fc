"""Reference prefix trie (plain Python): the flat layout of ``sigma_fast.PrefixTrie``, built
from sorted code tuples one level at a time.

Layout (int64 arrays; see ``PrefixTrie``): node ids are assigned level by level (root = 0, then
the depth-1 prefixes in sorted order, then the depth-2 prefixes, ...), so the children of a node
are consecutive ids and CSR slot e holds node e + 1.
"""

from __future__ import annotations

import numpy as np


def build_trie(codes, codebook_size: int) -> dict:
    """Flat trie of ``codes`` [N, L] (every code in [0, codebook_size)).

    Returns a dict of int64 arrays: ``level_offsets`` [L+2], ``child_offsets`` [nodes+1],
    ``child_tokens`` / ``child_nodes`` [nodes-1], ``node_parent`` [nodes], ``item_begin`` /
    ``item_end`` [nodes], ``item_perm`` [N] (sorted position -> row; equal codes keep row
    order), ``root_children`` [codebook_size]; plus ``num_nodes``.
    """
    codes = np.asarray(codes)
    n, levels = codes.shape
    rows = [tuple(int(c) for c in codes[r]) for r in range(n)]
    perm = sorted(range(n), key=lambda r: (rows[r], r))
    sorted_rows = [rows[r] for r in perm]

    # Node ids, level by level: the distinct prefixes of each length, in sorted order.
    node_of: dict[tuple, int] = {(): 0}
    prefixes = [()]
    level_offsets = [0, 1]
    for depth in range(1, levels + 1):
        for p in sorted({row[:depth] for row in sorted_rows}):
            node_of[p] = len(prefixes)
            prefixes.append(p)
        level_offsets.append(len(prefixes))
    nodes = len(prefixes)

    child_offsets = [0] * (nodes + 1)
    child_tokens, child_nodes, node_parent = [], [], [-1]
    for v in range(1, nodes):
        p = prefixes[v]
        child_tokens.append(p[-1])
        child_nodes.append(v)
        node_parent.append(node_of[p[:-1]])
        child_offsets[node_of[p[:-1]] + 1] += 1
    child_offsets = np.cumsum(child_offsets)

    item_begin, item_end = [], []
    for p in prefixes:
        inside = [s for s, row in enumerate(sorted_rows) if row[: len(p)] == p]
        item_begin.append(inside[0])
        item_end.append(inside[-1] + 1)

    root_children = [-1] * codebook_size
    for v in range(level_offsets[1], level_offsets[2]):
        root_children[prefixes[v][0]] = v

    as64 = lambda a: np.asarray(a, dtype=np.int64).reshape(-1)  # noqa: E731
    return {
        "num_nodes": nodes,
        "level_offsets": as64(level_offsets),
        "child_offsets": as64(child_offsets),
        "child_tokens": as64(child_tokens),
        "child_nodes": as64(child_nodes),
        "node_parent": as64(node_parent),
        "item_begin": as64(item_begin),
        "item_end": as64(item_end),
        "item_perm": as64(perm),
        "root_children": as64(root_children),
    }


def trie_walk(tokens, child_offsets, child_tokens, child_nodes) -> np.ndarray:
    """Node reached from the root by each row of ``tokens`` [B, l], or -1 where the path does
    not exist."""
    tokens = np.asarray(tokens)
    out = np.empty((tokens.shape[0],), dtype=np.int64)
    for i, seq in enumerate(tokens):
        node = 0
        for tok in seq:
            slots = range(child_offsets[node], child_offsets[node + 1])
            hit = [e for e in slots if child_tokens[e] == tok]
            if not hit:
                node = -1
                break
            node = int(child_nodes[hit[0]])
        out[i] = node
    return out


def allowed_nodes(item_mask, item_perm, item_begin, item_end) -> np.ndarray:
    """Node validity for item masks [M, id_bound] (by caller item id): ``out[m, v]`` is True iff
    some item below node v (sorted positions item_begin[v] .. item_end[v]-1) is allowed."""
    item_mask = np.asarray(item_mask, dtype=bool)
    nodes = len(item_begin)
    out = np.zeros((item_mask.shape[0], nodes), dtype=bool)
    for m, mask in enumerate(item_mask):
        for v in range(nodes):
            out[m, v] = any(mask[item_perm[p]] for p in range(item_begin[v], item_end[v]))
    return out
