"""Agreement of embedding tables with held-out co-interactions: recall@k."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["agreement_report", "recall_at_k"]


def recall_at_k(embeddings, held_out_pairs, k: int = 20, *, chunk: int = 1024) -> float:
    """Share of held-out pairs ``(a, b)`` whose ``b`` is among the ``k`` items most
    cosine-similar to ``a`` (``a`` itself excluded; ties: the smaller index ranks first).
    Pairs are scored as given (pass both directions for a symmetric measure)."""
    emb = F.normalize(torch.as_tensor(np.asarray(embeddings, dtype=np.float32)), dim=-1).numpy()
    pr = np.asarray(held_out_pairs, dtype=np.int64).reshape(-1, 2)
    if len(pr) == 0:
        raise ValueError("held_out_pairs is empty")
    n = emb.shape[0]
    if pr.min() < 0 or pr.max() >= n:
        raise ValueError(f"held_out_pairs must index rows in [0, {n}); got values in "
                         f"[{int(pr.min())}, {int(pr.max())}]")
    hits = 0
    for start in range(0, len(pr), chunk):
        a, b = pr[start:start + chunk, 0], pr[start:start + chunk, 1]
        sim = emb[a] @ emb.T
        sim[np.arange(len(a)), a] = -np.inf
        target = sim[np.arange(len(a)), b][:, None]
        # rank of b = items strictly better + equal-scored items with a smaller index
        better = (sim > target).sum(1)
        tied_before = ((sim == target) & (np.arange(n)[None, :] < b[:, None])).sum(1)
        hits += int(((better + tied_before) < k).sum())
    return hits / len(pr)


def agreement_report(held_out_pairs, k: int = 20, **embeddings) -> dict:
    """``{name: recall_at_k(emb, held_out_pairs, k)}`` for each named embedding table, e.g.
    ``agreement_report(val_pairs, 20, text=features, id=id_emb, grounded=grounded)``."""
    return {name: recall_at_k(emb, held_out_pairs, k) for name, emb in embeddings.items()}
