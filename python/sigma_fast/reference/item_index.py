"""Reference item index build (NumPy): item embeddings normalised and grouped by bucket, the
layout every backend of ``apf_fuse`` reads (see ``sigma_fast.ItemIndex``)."""

from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` divided by their norm (accumulated and divided in float64), as float32.
    Zero rows give NaN (callers reject them first)."""
    x64 = np.asarray(x, dtype=np.float32).astype(np.float64)
    norm = np.sqrt((x64 * x64).sum(axis=-1, keepdims=True))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x64 / norm).astype(np.float32)


def build_item_index(embeddings, buckets, num_buckets: int, item_ids=None):
    """The index layout (see ``sigma_fast.ItemIndex``) from float32 [N, D] embeddings and a
    bucket id per item.

    Returns ``(embeddings [N, D] float32, offsets [U + 1] int64, item_ids [N] int64,
    positions [N] int64)``: rows normalised and sorted by bucket, stable in item order;
    ``positions[i]`` is the storage row of input item i.
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    buckets = np.asarray(buckets, dtype=np.int64)
    n = emb.shape[0]
    ids = np.arange(n, dtype=np.int64) if item_ids is None else np.asarray(item_ids, np.int64)
    if n and (buckets.min() < 0 or buckets.max() >= num_buckets):
        i = int(np.nonzero((buckets < 0) | (buckets >= num_buckets))[0][0])
        raise IndexError(f"prefix bucket of item {i} is {buckets[i]}, outside [0, {num_buckets})")
    bad = ~np.isfinite(emb).all(axis=1) | ~(emb != 0).any(axis=1)
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        what = "has a non-finite value" if not np.isfinite(emb[i]).all() else "is all zeros"
        raise ValueError(f"embeddings must be finite, non-zero rows (they are L2-normalised); "
                         f"row {i} {what}")
    order = np.argsort(buckets, kind="stable")
    positions = np.empty(n, dtype=np.int64)
    positions[order] = np.arange(n, dtype=np.int64)
    offsets = np.zeros(num_buckets + 1, dtype=np.int64)
    np.cumsum(np.bincount(buckets, minlength=num_buckets), out=offsets[1:])
    return l2_normalize(emb)[order], offsets, ids[order], positions
