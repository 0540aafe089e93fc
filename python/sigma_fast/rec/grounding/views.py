"""Relevance views of items (DESIGN.md §1.1): co-interaction, shared attributes and text
neighbours, each a :class:`Pairs` of related items with sampling weights, and their merge."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Pairs", "attribute_pairs", "co_interaction_pairs", "merge_views", "neighbour_pairs"]


class Pairs(NamedTuple):
    """A view: related item pairs ``int64 [P, 2]`` and their sampling weights ``float32 [P]``."""

    pairs: np.ndarray
    weights: np.ndarray


def as_index_array(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.size == 0 and arr.ndim == 1:
        return arr.astype(np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-d integer array; got {arr.dtype} {list(arr.shape)}")
    return arr.astype(np.int64, copy=False)


def _empty_pairs() -> Pairs:
    return Pairs(np.zeros((0, 2), np.int64), np.zeros((0,), np.float32))


def co_interaction_pairs(users, items, timestamps=None, *, num_items: int | None = None,
                         window: int = 3) -> Pairs:
    """Items that occur within ``window`` positions of each other in a user's sequence.

    Each user's interactions are ordered by timestamp (stable, so ties keep input order; without
    timestamps input order is the sequence order). Every pair of positions ``t < s <= t + window``
    of distinct items counts once for the unordered pair ``(min, max)``; the pair's weight is

        count(i, j) / sqrt(pop_i * pop_j)

    with ``pop`` the items' training interaction counts, so that a few blockbusters, which co-occur
    with everything, do not dominate the view (the cosine normalisation of the co-occurrence
    matrix). Pass only training interactions. Returns pairs sorted by (i, j).
    """
    users = as_index_array(users, "users")
    items = as_index_array(items, "items")
    if users.shape != items.shape:
        raise ValueError(f"users and items must have the same length; got {len(users)} and "
                         f"{len(items)}")
    if window < 1:
        raise ValueError(f"window must be >= 1; got {window}")
    if len(items) == 0:
        return _empty_pairs()
    if (items < 0).any():
        raise ValueError(f"items must be >= 0; got {int(items.min())}")
    n = int(num_items) if num_items is not None else int(items.max()) + 1
    if items.max() >= n:
        raise ValueError(f"items must be < num_items = {n}; got {int(items.max())}")
    if timestamps is None:
        order = np.argsort(users, kind="stable")
    else:
        ts = np.asarray(timestamps, dtype=np.float64)
        order = np.lexsort((ts, users))  # lexsort is stable: ties keep input order
    u, seq = users[order], items[order]
    pop = np.bincount(items, minlength=n).astype(np.float64)
    keys = []
    for d in range(1, window + 1):
        same = u[d:] == u[:-d]
        a, b = seq[:-d][same], seq[d:][same]
        keep = a != b
        a, b = a[keep], b[keep]
        keys.append(np.minimum(a, b) * n + np.maximum(a, b))
    keys = np.concatenate(keys)
    if len(keys) == 0:
        return _empty_pairs()
    uniq, counts = np.unique(keys, return_counts=True)
    i, j = uniq // n, uniq % n
    weights = counts / np.sqrt(pop[i] * pop[j])
    return Pairs(np.stack([i, j], axis=1), weights.astype(np.float32))


def _multi_hot(genres, num_items: int) -> np.ndarray:
    if isinstance(genres, np.ndarray) and genres.ndim == 2:
        return genres.astype(bool)
    vocab: dict = {}
    rows = []
    for g in genres:
        rows.append([vocab.setdefault(x, len(vocab)) for x in g])
    out = np.zeros((num_items, max(len(vocab), 1)), dtype=bool)
    for r, cols in enumerate(rows):
        out[r, cols] = True
    return out


def attribute_pairs(genres, years=None, *, era: int = 10, k: int = 10,
                    chunk: int = 1024) -> Pairs:
    """Each item's ``k`` most attribute-similar items: same era and at least one shared genre.

    ``genres`` is a list (one entry per item) of genre labels, or a bool multi-hot [N, G] array;
    ``years`` an optional [N] array (NaN or negative = unknown). Two items are candidates when
    they share a genre and, when both years are known, ``year // era`` agrees (an unknown year
    matches any era). Candidates are ranked by genre Jaccard similarity (ties: the smaller item
    index) and the Jaccard value is the pair's weight. Returns directed pairs ``(i, j)``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    n = len(genres)
    mh = _multi_hot(genres, n).astype(np.float32)
    sizes = mh.sum(axis=1)
    if years is None:
        era_id = np.full(n, -1, dtype=np.int64)
    else:
        y = np.asarray(years, dtype=np.float64)
        if y.shape != (n,):
            raise ValueError(f"years must have shape [{n}] (one per item); got {list(y.shape)}")
        known = np.isfinite(y) & (y >= 0)
        era_id = np.where(known, np.floor(np.where(known, y, 0) / era), -1).astype(np.int64)
    out_i, out_j, out_w = [], [], []
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        inter = mh[rows] @ mh.T
        jac = inter / np.maximum(sizes[rows, None] + sizes[None, :] - inter, 1.0)
        e_r, e_c = era_id[rows, None], era_id[None, :]
        ok = (inter > 0) & ((e_r == e_c) | (e_r < 0) | (e_c < 0))
        ok[np.arange(rows.stop - start), np.arange(start, rows.stop)] = False
        score = np.where(ok, jac, -1.0)
        kk = min(k, n)
        # stable sort on -score keeps the smaller index first among ties
        top = np.argsort(-score, axis=1, kind="stable")[:, :kk]
        s = np.take_along_axis(score, top, axis=1)
        r, c = np.nonzero(s > 0)
        out_i.append(r + start)
        out_j.append(top[r, c])
        out_w.append(s[r, c])
    if not out_i:
        return _empty_pairs()
    return Pairs(np.stack([np.concatenate(out_i), np.concatenate(out_j)], 1).astype(np.int64),
                 np.concatenate(out_w).astype(np.float32))


def neighbour_pairs(embeddings, *, k: int = 10, chunk: int = 1024) -> Pairs:
    """Each item's ``k`` nearest neighbours by cosine similarity of pretrained (e.g. sentence
    encoder) embeddings, excluding itself; ties go to the smaller index. Weight = the cosine,
    clamped at 0 (pairs with non-positive cosine are dropped). Returns directed pairs."""
    emb = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
    if emb.dim() != 2:
        raise ValueError(f"embeddings must be 2-d [N, H]; got shape {list(emb.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    n = emb.shape[0]
    emb = F.normalize(emb, dim=-1).numpy()
    out_i, out_j, out_w = [], [], []
    kk = min(k, n - 1)
    if kk <= 0:
        return _empty_pairs()
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        sim = emb[start:stop] @ emb.T
        sim[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        top = np.argsort(-sim, axis=1, kind="stable")[:, :kk]
        s = np.take_along_axis(sim, top, axis=1)
        r, c = np.nonzero(s > 0)
        out_i.append(r + start)
        out_j.append(top[r, c])
        out_w.append(s[r, c])
    return Pairs(np.stack([np.concatenate(out_i), np.concatenate(out_j)], 1).astype(np.int64),
                 np.concatenate(out_w).astype(np.float32))


def merge_views(*views: Pairs, shares=None) -> Pairs:
    """Concatenate views, rescaling each view's weights to sum to its share (default: equal
    shares), so a view's size does not decide how often it is sampled."""
    views = [v for v in views]
    if shares is None:
        shares = [1.0] * len(views)
    if len(shares) != len(views):
        raise ValueError(f"shares must have one entry per view ({len(views)}); got {len(shares)}")
    pairs, weights = [], []
    for v, share in zip(views, shares):
        if len(v.pairs) == 0:
            continue
        w = np.asarray(v.weights, dtype=np.float64)
        pairs.append(np.asarray(v.pairs, dtype=np.int64))
        weights.append(w / w.sum() * float(share))
    if not pairs:
        return _empty_pairs()
    return Pairs(np.concatenate(pairs), np.concatenate(weights).astype(np.float32))
