"""Multi-view grounding of a :class:`RecDataset`: the glue between the dataset layer and the
array-level functions of :mod:`sigma_fast.grounding`.

Views come from the training split only:

- co-interaction: items within ``window`` positions in a user's training sequence, weighted by
  1/sqrt(pop_i pop_j) so blockbusters do not dominate;
- attribute: items sharing a genre and an era (decade);
- semantic: nearest neighbours of the frozen text features.

The held-out agreement set pairs each user's last training item with their validation target:
interactions no view has seen. ``agreement`` reports recall@k of those pairs for the raw text
features, the collaborative ID embeddings and the grounded embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dataset import RecDataset


@dataclass
class GroundingResult:
    model: object                 # sigma_fast.grounding.GroundingModel
    grounded: np.ndarray          # float32 [I, dim], unit rows
    id_embeddings: np.ndarray     # float32 [I, d_id], the frozen BPR teacher
    agreement: dict               # {"text": r, "id": r, "grounded": r} recall@k on held-out pairs
    k: int


def training_interactions(ds: RecDataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, timestamps) of every training-split interaction."""
    users, items, times = [], [], []
    for u in range(ds.num_users):
        n = int(ds.n_train[u])
        users.append(np.full(n, u, dtype=np.int64))
        items.append(ds.sequence(u)[:n].astype(np.int64))
        times.append(ds.times(u)[:n])
    return np.concatenate(users), np.concatenate(items), np.concatenate(times)


def held_out_pairs(ds: RecDataset) -> np.ndarray:
    """int64 [P, 2]: (last training item, validation target) per user, both directions, distinct
    items only."""
    rows = []
    for u in range(ds.num_users):
        n, target = int(ds.n_train[u]), int(ds.valid_target[u])
        if n and target >= 0:
            last = int(ds.sequence(u)[n - 1])
            if last != target:
                rows += [(last, target), (target, last)]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def ground_dataset(ds: RecDataset, features: np.ndarray, *, dim: int = 64, epochs: int = 10,
                   batch_size: int = 256, tau: float = 0.05, lam: float = 1.0,
                   id_dim: int = 64, id_epochs: int = 10, window: int = 3, k_attr: int = 10,
                   k_sem: int = 10, k_eval: int = 20, seed: int = 0,
                   progress: bool | None = None) -> GroundingResult:
    """Build the views, train the BPR teacher and the grounding projection, and report the
    held-out agreement (see the module docstring)."""
    from ..grounding import (agreement_report, attribute_pairs, co_interaction_pairs,
                             merge_views, neighbour_pairs, train_bpr, train_grounding)

    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[0] != ds.num_items:
        raise ValueError(f"features must be [num_items = {ds.num_items}, H]; got shape "
                         f"{list(features.shape)}")
    users, items, times = training_interactions(ds)
    views = [co_interaction_pairs(users, items, times, num_items=ds.num_items, window=window)]
    if ds.item_genre_mask is not None and ds.item_genre_mask.shape[1]:
        years = np.asarray(ds.item_years)
        views.append(attribute_pairs(ds.item_genre_mask, np.where(years >= 0, years, -1),
                                     k=k_attr))
    views.append(neighbour_pairs(features, k=k_sem))
    view = merge_views(*views)
    id_emb = train_bpr(users, items, num_users=ds.num_users, num_items=ds.num_items,
                       dim=id_dim, epochs=id_epochs, seed=seed, progress=progress)
    model = train_grounding(features, view.pairs, id_emb, weights=view.weights, dim=dim,
                            epochs=epochs, batch_size=batch_size, tau=tau, lam=lam, seed=seed,
                            progress=progress)
    grounded = model.embed(features)
    report = agreement_report(held_out_pairs(ds), k_eval, text=features, id=id_emb,
                              grounded=grounded)
    return GroundingResult(model=model, grounded=grounded, id_embeddings=id_emb,
                           agreement=report, k=k_eval)


def hashed_text_features(texts: list[str], dim: int = 512) -> np.ndarray:
    """A cheap, deterministic bag-of-words text embedding (hashed unigrams and bigrams,
    log-scaled, L2-normalised): the light stand-in for a sentence encoder in tests and quick
    runs."""
    import zlib

    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        words = [w.strip(".,:;()!?\"'").lower() for w in text.split()]
        words = [w for w in words if w]
        grams = words + [a + " " + b for a, b in zip(words, words[1:])]
        for g in grams:
            out[row, zlib.crc32(g.encode()) % dim] += 1.0
    out = np.log1p(out)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1.0)
