"""Reference adaptive probabilistic fusion (NumPy).

Storage mirrors the kernels: index rows and queries are normalised to float32 (norm
accumulated in float64); similarities, temperatures and log-probabilities are then evaluated in
float64 from those float32 vectors, so this is the "exact" answer the fast backends approximate.
They compute similarities in float32 and may disagree only where two candidates are within
float32 rounding (see ``sigma_fast.testing.assert_apf_close``).
"""

from __future__ import annotations

import numpy as np

from .item_index import l2_normalize


def _np(a) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor, without importing torch here
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + float(np.log(np.exp(x - m).sum()))


def apf_fuse(prefix_scores, prefix_ids, queries, index, *, top_m: int, top_n: int, tau: float,
             adaptive: bool = True, sigma_min: float = 1e-3, allowed=None,
             normalize: str = "top_m", dedup: bool = True, return_buckets: bool = False):
    """Adaptive probabilistic fusion; see ``sigma_fast.apf_fuse`` for the contract.

    ``index`` is anything with ``embeddings``, ``offsets`` and ``item_ids`` in the layout of
    ``sigma_fast.ItemIndex`` (torch tensors or NumPy arrays). ``allowed`` is None, bool
    [id_bound] or bool [B, id_bound]. Returns NumPy arrays: ``(item_ids [B, N], log_probs
    [B, N], source_ranks [B, N])``, plus ``(bucket_item_ids [B, K, M], bucket_sims [B, K, M])``
    with ``return_buckets``.
    """
    phi = np.asarray(_np(prefix_scores), dtype=np.float32)
    pids = np.asarray(_np(prefix_ids), dtype=np.int64)
    q = np.asarray(_np(queries), dtype=np.float32)
    emb = _np(index.embeddings)
    offsets = _np(index.offsets)
    ids = _np(index.item_ids)
    mask = None if allowed is None else np.asarray(_np(allowed), dtype=bool)
    if mask is not None and mask.ndim == 1:
        mask = np.broadcast_to(mask, (phi.shape[0], mask.shape[0]))
    batch, k_beams = phi.shape
    out_ids = np.full((batch, top_n), -1, dtype=np.int64)
    out_logp = np.full((batch, top_n), -np.inf, dtype=np.float32)
    out_src = np.full((batch, top_n), -1, dtype=np.int64)
    b_ids = np.full((batch, k_beams, top_m), -1, dtype=np.int64)
    b_sims = np.full((batch, k_beams, top_m), -np.inf, dtype=np.float32)

    for b in range(batch):
        beams = [k for k in range(k_beams) if np.isfinite(phi[b, k])]
        if not beams:
            continue  # every beam is padding: the request's outputs stay padding
        if adaptive:
            sigma = float(np.std(phi[b, beams].astype(np.float64)))  # population std
            t = max(sigma, sigma_min) / tau
        else:
            t = 1.0 / tau
        candidates = []  # (log P, item id, beam k)
        for k in beams:
            u = pids[b, k]
            rows = np.arange(offsets[u], offsets[u + 1])
            if mask is not None:
                rows = rows[mask[b, ids[rows]]]
            if len(rows) == 0:
                continue  # empty bucket, or every item of it masked out
            h = l2_normalize(q[b, k])
            s = emb[rows].astype(np.float64) @ h.astype(np.float64)
            rank = np.lexsort((ids[rows], -s))  # larger similarity first, ties: smaller id
            kept = rank[:top_m]
            lse = _logsumexp(t * s[kept] if normalize == "top_m" else t * s)
            for j in kept:
                candidates.append((float(phi[b, k]) + t * s[j] - lse, int(ids[rows[j]]), k))
            b_ids[b, k, :len(kept)] = ids[rows[kept]]
            b_sims[b, k, :len(kept)] = s[kept]
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))  # ties: smaller id, then smaller k
        if dedup:
            seen, unique = set(), []
            for c in candidates:
                if c[1] not in seen:
                    seen.add(c[1])
                    unique.append(c)
            candidates = unique
        for n, (logp, item, k) in enumerate(candidates[:top_n]):
            out_ids[b, n], out_logp[b, n], out_src[b, n] = item, logp, k
    if return_buckets:
        return out_ids, out_logp, out_src, b_ids, b_sims
    return out_ids, out_logp, out_src
