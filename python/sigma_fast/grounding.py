"""Multi-view semantic grounding (DESIGN.md §1.1): relevance views, the collaborative ID teacher,
the grounding losses and the trainable projection of frozen text features.

Everything here works on plain arrays so it does not depend on a dataset class:

- item features: float32 [N, H] frozen text features (e.g. MiniLM or LM last-token states);
- interactions: parallel int arrays ``users``, ``items`` (and optional ``timestamps``) of the
  *training* split only;
- a view is a :class:`Pairs` ``(pairs int64 [P, 2], weights float32 [P])`` of related items.

>>> co = co_interaction_pairs(users, items, timestamps, num_items=n, window=3)
>>> attr = attribute_pairs(genres, years, k=10)
>>> nn = neighbour_pairs(minilm, k=10)
>>> view = merge_views(co, attr, nn)
>>> id_emb = train_bpr(users, items, num_users=u, num_items=n, seed=0)
>>> model = train_grounding(features, view.pairs, id_emb, weights=view.weights, dim=64)
>>> grounded = model.embed(features)                  # float32 [N, 64], unit rows
>>> recall_at_k(grounded, held_out.pairs, k=20)
>>> model.save("grounding_dir"); GroundingModel.load("grounding_dir")

The same losses train the LM itself with :func:`train_text_tower` (a :class:`TextTower`: the
frozen LM's cached features + projection, or the LM's last ``n`` layers from cached hidden
states, or the whole LM with ``finetune="full"``):

>>> tower = train_text_tower(texts, view.pairs, id_emb, encoder="smollm2", train_layers=1)
>>> tower.embed_texts(new_texts)                      # float32 [M, 64], unit rows
>>> tower.save("tower_dir"); TextTower.load("tower_dir")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._io import atomic_save_tensors, atomic_write_json, load_tensors, read_artifact_config

__all__ = [
    "GroundingModel",
    "Pairs",
    "TextTower",
    "agreement_report",
    "attribute_pairs",
    "co_interaction_pairs",
    "grounding_loss",
    "info_nce_loss",
    "kd_loss",
    "merge_views",
    "neighbour_pairs",
    "recall_at_k",
    "train_bpr",
    "train_grounding",
    "train_text_tower",
]


_FORMAT = "sigma_fast.GroundingModel"
_FORMAT_VERSION = 1
_CONFIG_FILE = "grounding_config.json"
_WEIGHTS_FILE = "grounding.safetensors"


# ----------------------------------------------------------------------------------- losses
def _cosine_logits(v: torch.Tensor, u: torch.Tensor, tau: float) -> torch.Tensor:
    return F.normalize(v, dim=-1) @ F.normalize(u, dim=-1).T / tau


def _check_tau(tau: float) -> float:
    if not tau > 0:
        raise ValueError(f"tau must be > 0; got {tau}")
    return float(tau)


def info_nce_loss(v: torch.Tensor, u: torch.Tensor, tau: float = 0.05) -> torch.Tensor:
    """Symmetric in-batch InfoNCE (``L_CL``) for positive pairs ``(v[i], u[i])``.

    With ``S[i, j] = cos(v[i], u[j]) / tau`` (B x B)::

        L = 1/2 * mean_i( -log softmax_j S[i, :][i] )  +  1/2 * mean_j( -log softmax_i S[:, j][j] )

    Every other row of the batch is a negative.
    """
    if v.shape != u.shape or v.dim() != 2:
        raise ValueError(f"v and u must both be [B, D]; got {list(v.shape)} and {list(u.shape)}")
    logits = _cosine_logits(v, u, _check_tau(tau))
    target = torch.arange(v.shape[0], device=v.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def kd_loss(v_text: torch.Tensor, v_id: torch.Tensor, tau: float = 0.05, *,
            u_text: torch.Tensor | None = None, u_id: torch.Tensor | None = None) -> torch.Tensor:
    """``L_KD = mean_i KL(P_ID[i] || P_text[i])``, the collaborative teacher's in-batch
    similarity distribution distilled into the text space.

    ``P_text[i, j] = softmax_j cos(v_text[i], u_text[j]) / tau`` and likewise ``P_ID`` from the
    ID embeddings, which are the frozen teacher: no gradient flows into ``v_id`` / ``u_id``.
    The columns default to the rows (``u = v``, the batch against itself); grounding passes the
    positives of the pairs as columns, matching ``L_CL``'s similarity matrix::

        KL(P || Q)[i] = sum_j P[i, j] * (log P[i, j] - log Q[i, j])
    """
    u_text = v_text if u_text is None else u_text
    u_id = v_id if u_id is None else u_id
    if v_text.shape[0] != v_id.shape[0] or u_text.shape[0] != u_id.shape[0]:
        raise ValueError(f"text and ID embeddings must have the same batch size; got "
                         f"{v_text.shape[0]}/{u_text.shape[0]} text rows and "
                         f"{v_id.shape[0]}/{u_id.shape[0]} ID rows")
    tau = _check_tau(tau)
    log_q = F.log_softmax(_cosine_logits(v_text, u_text, tau), dim=-1)
    with torch.no_grad():
        log_p = F.log_softmax(_cosine_logits(v_id.detach(), u_id.detach(), tau), dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def grounding_loss(v_text: torch.Tensor, u_text: torch.Tensor, v_id: torch.Tensor | None = None,
                   u_id: torch.Tensor | None = None, *, tau: float = 0.05,
                   lam: float = 1.0) -> torch.Tensor:
    """``L_CL + lam * L_KD`` for a batch of positive pairs: ``v_*`` are the anchors' text / ID
    embeddings, ``u_*`` the positives'. Without ID embeddings (or with ``lam = 0``) it is
    ``L_CL`` alone (the "without KD" ablation)."""
    loss = info_nce_loss(v_text, u_text, tau)
    if lam != 0:
        if v_id is None or u_id is None:
            raise ValueError("grounding_loss with lam != 0 needs v_id and u_id")
        loss = loss + lam * kd_loss(v_text, v_id, tau, u_text=u_text, u_id=u_id)
    return loss


# ------------------------------------------------------------------------------------ views
class Pairs(NamedTuple):
    """A view: related item pairs ``int64 [P, 2]`` and their sampling weights ``float32 [P]``."""

    pairs: np.ndarray
    weights: np.ndarray


def _as_index_array(a, name: str) -> np.ndarray:
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
    users = _as_index_array(users, "users")
    items = _as_index_array(items, "items")
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


# ------------------------------------------------------------------- collaborative teacher
def train_bpr(users, items, *, num_users: int | None = None, num_items: int | None = None,
              dim: int = 64, epochs: int = 5, batch_size: int = 1024, lr: float = 0.01,
              l2: float = 1e-4, seed: int = 0, progress: bool | None = None) -> np.ndarray:
    """BPR matrix factorisation on training (user, item) pairs; returns the item table
    float32 [num_items, dim] (the frozen collaborative ID embeddings).

    Each epoch visits every interaction once in a seeded random order, with one uniformly drawn
    negative item per positive (redrawn once if it is one of the user's positives), and minimises
    ``-log sigmoid(<p_u, q_i> - <p_u, q_j>) + l2 * (|p_u|^2 + |q_i|^2 + |q_j|^2)`` with Adam.
    Deterministic for a seed on a given machine (CPU).
    """
    from tqdm.auto import tqdm

    users = _as_index_array(users, "users")
    items = _as_index_array(items, "items")
    if users.shape != items.shape or len(users) == 0:
        raise ValueError(f"users and items must be non-empty and of the same length; got "
                         f"{len(users)} and {len(items)}")
    nu = int(num_users) if num_users is not None else int(users.max()) + 1
    ni = int(num_items) if num_items is not None else int(items.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    p = nn.Parameter(torch.randn(nu, dim, generator=gen) * 0.1)
    q = nn.Parameter(torch.randn(ni, dim, generator=gen) * 0.1)
    opt = torch.optim.Adam([p, q], lr=lr)
    u_t, i_t = torch.from_numpy(users), torch.from_numpy(items)
    positives = torch.from_numpy(np.unique(users * ni + items))  # sorted
    m = len(users)
    steps = epochs * ((m + batch_size - 1) // batch_size)
    bar = tqdm(total=steps, desc="BPR", unit="step", leave=False,
               disable=(not progress) if progress is not None else None)
    for _ in range(epochs):
        perm = torch.randperm(m, generator=gen)
        for start in range(0, m, batch_size):
            idx = perm[start:start + batch_size]
            u, i = u_t[idx], i_t[idx]
            j = torch.randint(ni, (len(idx),), generator=gen)
            key = u * ni + j  # a (user, item) pair is a positive iff its key is in the table
            at = torch.searchsorted(positives, key).clamp(max=len(positives) - 1)
            hit = positives[at] == key
            j = torch.where(hit, torch.randint(ni, (len(idx),), generator=gen), j)
            pu, qi, qj = p[u], q[i], q[j]
            x = (pu * (qi - qj)).sum(-1)
            loss = -F.logsigmoid(x).mean() + l2 * (pu.square().sum(-1) + qi.square().sum(-1)
                                                    + qj.square().sum(-1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    bar.close()
    return q.detach().numpy().astype(np.float32)


# ---------------------------------------------------------------------------- text tower
class GroundingModel(nn.Module):
    """Frozen text features [.., H] -> down-projection (linear, or a one-hidden-layer MLP when
    ``hidden`` is given) -> L2 normalisation: ``v_text`` [.., dim]."""

    def __init__(self, in_dim: int, dim: int = 64, hidden: int | None = None):
        super().__init__()
        self.in_dim, self.dim, self.hidden = int(in_dim), int(dim), hidden
        if hidden is None:
            self.proj = nn.Linear(in_dim, dim)
        else:
            self.proj = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.history: list[dict] = []

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(features), dim=-1)

    @torch.no_grad()
    def embed(self, features, batch_size: int = 4096) -> np.ndarray:
        """Grounded embeddings float32 [N, dim] (unit rows) of a feature array."""
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        was_training = self.training
        self.eval()
        out = [self(x[s:s + batch_size]) for s in range(0, len(x), batch_size)]
        self.train(was_training)
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``grounding.safetensors`` (weights) and ``grounding_config.json`` (shape and
        training history) into ``directory``, each replaced atomically."""
        directory = Path(directory)
        atomic_save_tensors(directory / _WEIGHTS_FILE, self.state_dict(),
                            metadata={"format": _FORMAT})
        atomic_write_json(directory / _CONFIG_FILE, {
            "format": _FORMAT, "format_version": _FORMAT_VERSION, "in_dim": self.in_dim,
            "dim": self.dim, "hidden": self.hidden, "history": self.history})
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "GroundingModel":
        directory, path, config = read_artifact_config(
            directory, _CONFIG_FILE, _FORMAT, _FORMAT_VERSION, "a grounding model")
        try:
            model = cls(int(config["in_dim"]), int(config["dim"]), config.get("hidden"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: malformed grounding config: {exc}") from exc
        try:
            model.load_state_dict(load_tensors(directory / _WEIGHTS_FILE))
        except RuntimeError as exc:
            raise ValueError(f"{directory / _WEIGHTS_FILE} does not match {path}: {exc}") from exc
        model.history = list(config.get("history", []))
        return model.eval()


def _check_training_inputs(n: int, pairs, id_embeddings, weights, lam: float):
    pr = np.asarray(pairs)
    if pr.ndim != 2 or pr.shape[1] != 2 or not np.issubdtype(pr.dtype, np.integer):
        raise ValueError(f"pairs must be an integer [P, 2] array; got {pr.dtype} {list(pr.shape)}")
    if len(pr) == 0:
        raise ValueError("pairs is empty: grounding needs at least one relevance pair")
    if pr.min() < 0 or pr.max() >= n:
        raise ValueError(f"pairs must index items in [0, {n}); got values in "
                         f"[{int(pr.min())}, {int(pr.max())}]")
    if lam != 0:
        if id_embeddings is None:
            raise ValueError("grounding with lam != 0 needs id_embeddings (the KD teacher)")
        ids = torch.as_tensor(np.asarray(id_embeddings, dtype=np.float32))
        if ids.dim() != 2 or ids.shape[0] != n:
            raise ValueError(f"id_embeddings must be [{n}, D] (one row per item); got "
                             f"{list(ids.shape)}")
    else:
        ids = None
    w = None
    if weights is not None:
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        if w.shape != (len(pr),) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be [{len(pr)}] finite, non-negative, not all zero")
    return torch.from_numpy(pr.astype(np.int64)), ids, w


def _fit(encode, modules: list[nn.Module], optimizer, pr_t: torch.Tensor, ids, w, *,
         epochs: int, batch_size: int, tau: float, lam: float, gen: torch.Generator,
         history: list, device="cpu", desc: str = "grounding",
         pairs_per_epoch: int | None = None, progress: bool | None = None) -> None:
    """The grounding loop shared by every text tower: per batch of pairs ``(a, b)`` the unique
    items are embedded once by ``encode(idx) -> v_text [len(idx), dim]`` and the loss is
    ``L_CL(v_a, v_b) + lam * L_KD``. An epoch visits ``pairs_per_epoch`` pairs (default: P),
    drawn in proportion to ``w`` with replacement, or without weights the first ones of a seeded
    permutation. Per-epoch mean losses go to ``history``."""
    from tqdm.auto import tqdm

    ids = ids.to(device) if ids is not None else None
    total = len(pr_t)
    p = total if pairs_per_epoch is None else max(1, min(int(pairs_per_epoch), total))
    steps_per_epoch = (p + batch_size - 1) // batch_size
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, unit="step", leave=False,
               disable=(not progress) if progress is not None else None)
    for m in modules:
        m.train()
    for epoch in range(len(history), len(history) + epochs):
        order = (torch.randperm(total, generator=gen)[:p] if w is None
                 else torch.multinomial(w, p, replacement=True, generator=gen))
        sums = {"loss": 0.0, "cl": 0.0, "kd": 0.0}
        for start in range(0, p, batch_size):
            batch = pr_t[order[start:start + batch_size]]
            if len(batch) < 2:  # in-batch losses need a negative
                continue
            both = torch.cat([batch[:, 0], batch[:, 1]])
            uniq, inv = torch.unique(both, return_inverse=True)
            v = encode(uniq)
            va, vb = v[inv[:len(batch)]], v[inv[len(batch):]]
            cl = info_nce_loss(va, vb, tau)
            kd = None
            if ids is not None:
                a, b = batch[:, 0].to(device), batch[:, 1].to(device)
                kd = kd_loss(va, ids[a], tau, u_text=vb, u_id=ids[b])
            loss = cl + lam * kd if kd is not None else cl
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            k = len(batch) / p
            sums["loss"] += loss.item() * k
            sums["cl"] += cl.item() * k
            sums["kd"] += (kd.item() if kd is not None else 0.0) * k
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        history.append({"epoch": epoch, **sums})
    bar.close()
    for m in modules:
        m.eval()


def train_grounding(features, pairs, id_embeddings=None, *, weights=None, dim: int = 64,
                    hidden: int | None = None, epochs: int = 10, batch_size: int = 256,
                    lr: float = 1e-3, tau: float = 0.05, lam: float = 1.0, seed: int = 0,
                    progress: bool | None = None) -> GroundingModel:
    """Train a :class:`GroundingModel` on relevance pairs with ``L_CL + lam * L_KD``.

    Args:
        features: float32 [N, H] frozen text features.
        pairs: int [P, 2] related item pairs (e.g. ``merge_views(...).pairs``).
        id_embeddings: float32 [N, D_id] frozen collaborative embeddings (the KD teacher);
            may be None only with ``lam = 0``.
        weights: optional [P] sampling weights; each epoch draws P pairs with replacement in
            proportion to them (without weights: every pair once, in a seeded random order).

    Deterministic for a seed on a given machine. The per-epoch mean losses are appended to
    ``model.history`` as dicts ``{"epoch", "loss", "cl", "kd"}``.
    """
    feats = torch.as_tensor(np.asarray(features, dtype=np.float32))
    if feats.dim() != 2:
        raise ValueError(f"features must be 2-d [N, H]; got shape {list(feats.shape)}")
    pr_t, ids, w = _check_training_inputs(feats.shape[0], pairs, id_embeddings, weights, lam)
    torch.manual_seed(seed)  # parameter init
    gen = torch.Generator().manual_seed(seed)
    model = GroundingModel(feats.shape[1], dim, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    _fit(lambda idx: model(feats[idx]), [model], opt, pr_t, ids, w, epochs=epochs,
         batch_size=batch_size, tau=tau, lam=lam, gen=gen, history=model.history,
         progress=progress)
    return model


# ------------------------------------------------------------------- trainable text tower
_TOWER_FORMAT = "sigma_fast.TextTower"
_TOWER_VERSION = 1
_TOWER_CONFIG = "tower_config.json"
_TOWER_BODY = "body.safetensors"


class TextTower(nn.Module):
    """The whole text tower: item text -> [LM body] -> pooled, L2-normalised LM features ->
    ``head`` (:class:`GroundingModel`: down-projection + L2 normalisation) -> ``v_text``.

    ``mode`` says what the body is and what it reads:

    - ``"frozen"``: no body; the head reads cached frozen features
      (:func:`sigma_fast.data.text.text_features`);
    - ``"layers"``: an :class:`~sigma_fast.data.text.LMTail` (the LM's last ``n`` layers, final
      norm, pooling) reading the cached hidden states entering those layers
      (:func:`sigma_fast.data.text.layer_inputs`);
    - ``"full"``: an :class:`~sigma_fast.data.text.LMFull` (the whole LM) reading tokenized text.
    """

    def __init__(self, head: GroundingModel, body: nn.Module | None = None, *,
                 encoder: str | None = None, pooling: str | None = None,
                 max_length: int = 128):
        super().__init__()
        self.head, self.body = head, body
        self.encoder, self.pooling, self.max_length = encoder, pooling, int(max_length)
        self._tokenizer = None

    @property
    def mode(self) -> str:
        if self.body is None:
            return "frozen"
        return "full" if hasattr(self.body, "lm") else "layers"

    @property
    def history(self) -> list:
        return self.head.history

    def tokenizer(self):
        if self._tokenizer is None:
            from .data.text import load_tokenizer

            self._tokenizer = load_tokenizer(self.encoder, self.pooling)
        return self._tokenizer

    def _device(self):
        return next(self.head.parameters()).device

    def encode_items(self, idx, *, features=None, inputs=None, texts=None) -> torch.Tensor:
        """``v_text`` [len(idx), dim] (differentiable) of items ``idx`` from what this mode
        reads: ``features`` [N, H] tensor (frozen), ``inputs`` LayerInputs (layers) or
        ``texts`` (full)."""
        dev = self._device()
        if self.mode == "frozen":
            return self.head(features[idx].to(dev))
        if self.mode == "layers":
            return self.head(self.body(*inputs.batch(idx.cpu().numpy(), self.pooling, dev)))
        from .data.text import _tokenize

        batch = _tokenize(self.tokenizer(), [texts[i] for i in idx.tolist()], self.max_length,
                          dev)
        return self.head(self.body(batch))

    @torch.no_grad()
    def embed(self, *, features=None, inputs=None, texts=None,
              batch_size: int = 256) -> np.ndarray:
        """Grounded embeddings float32 [N, dim] (unit rows) of N items, from the input this mode
        reads (see :meth:`encode_items`)."""
        was = self.training
        self.eval()
        if features is not None:
            features = torch.as_tensor(np.asarray(features, dtype=np.float32))
        n = len(features) if features is not None else (
            len(inputs.lengths) if inputs is not None else len(texts))
        out = [self.encode_items(torch.arange(s, min(s + batch_size, n)), features=features,
                                 inputs=inputs, texts=texts).float().cpu()
               for s in range(0, n, batch_size)]
        self.train(was)
        return torch.cat(out).numpy() if out else np.zeros((0, self.head.dim), np.float32)

    def embed_texts(self, texts: list[str], *, cache_dir=None, batch_size: int = 64,
                    progress: bool | None = None) -> np.ndarray:
        """Grounded embeddings float32 [N, dim] of new item texts: runs (and caches) the frozen
        part of the LM as needed, then the trained part."""
        from .data.text import layer_inputs, text_features

        texts = list(texts)
        if self.encoder is None:
            raise ValueError("this tower was trained on precomputed features (no encoder); "
                             "embed items with tower.embed(features=...) instead")
        dev = self._device()
        if self.mode == "frozen":
            feats = text_features(texts, self.encoder, cache_dir=cache_dir, pooling=self.pooling,
                                  max_length=self.max_length, batch_size=batch_size,
                                  device=dev, progress=progress)
            return self.embed(features=feats)
        if self.mode == "layers":
            inputs = layer_inputs(texts, self.encoder, self.body.n, cache_dir=cache_dir,
                                  pooling=self.pooling, max_length=self.max_length,
                                  batch_size=batch_size, device=dev, progress=progress)
            return self.embed(inputs=inputs, batch_size=batch_size)
        return self.embed(texts=texts, batch_size=batch_size)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tower_config.json``, the head (:meth:`GroundingModel.save`, under ``head/``)
        and the trained body's weights ``body.safetensors`` (layers/full modes), each atomically.
        The frozen part of the LM is not copied: :meth:`load` reads it from ``encoder``."""
        directory = Path(directory)
        self.head.save(directory / "head")
        config = {"format": _TOWER_FORMAT, "format_version": _TOWER_VERSION, "mode": self.mode,
                  "encoder": None if self.encoder is None else str(self.encoder),
                  "pooling": self.pooling, "max_length": self.max_length}
        if self.body is not None:
            lm_config = self.body.config if self.mode == "layers" else self.body.lm.config
            config["lm_config"] = lm_config.to_dict()
            config["train_layers"] = self.body.n if self.mode == "layers" else None
            atomic_save_tensors(directory / _TOWER_BODY, self.body.state_dict(),
                                metadata={"format": _TOWER_FORMAT})
        atomic_write_json(directory / _TOWER_CONFIG, config)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device="cpu") -> "TextTower":
        directory, path, config = read_artifact_config(
            directory, _TOWER_CONFIG, _TOWER_FORMAT, _TOWER_VERSION, "a text tower")
        head = GroundingModel.load(directory / "head")
        mode = config.get("mode")
        body = None
        if mode in ("layers", "full"):
            from transformers import AutoConfig, AutoModel

            from .data.text import LMFull, LMTail

            try:
                d = dict(config["lm_config"])
                lm_config = AutoConfig.for_model(d.pop("model_type"), **d)
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}: malformed lm_config: {exc}") from exc
            if mode == "layers":
                body = LMTail.from_config(lm_config, int(config["train_layers"]),
                                          config["pooling"])
            else:
                body = LMFull(AutoModel.from_config(lm_config), config["pooling"])
            try:
                body.load_state_dict(load_tensors(directory / _TOWER_BODY))
            except RuntimeError as exc:
                raise ValueError(f"{directory / _TOWER_BODY} does not match {path}: {exc}") \
                    from exc
        elif mode != "frozen":
            raise ValueError(f"{path}: unknown tower mode {mode!r}")
        tower = cls(head, body, encoder=config.get("encoder"), pooling=config.get("pooling"),
                    max_length=int(config.get("max_length", 128)))
        return tower.to(device).eval()


def train_text_tower(texts: list[str], pairs, id_embeddings=None, *,
                     encoder: str | os.PathLike = "minilm", train_layers: int = 0,
                     finetune: str | None = None, weights=None, dim: int = 64,
                     hidden: int | None = None, epochs: int = 10, batch_size: int = 256,
                     lr: float = 1e-3, lm_lr: float | None = None, tau: float = 0.05,
                     lam: float = 1.0, device="cpu", cache_dir=None, pooling: str | None = None,
                     max_length: int = 128, pairs_per_epoch: int | None = None,
                     seed: int = 0, features=None, inputs=None,
                     progress: bool | None = None) -> TextTower:
    """Train a :class:`TextTower` on relevance pairs of ``texts`` with ``L_CL + lam * L_KD``.

    - ``train_layers = 0`` and no ``finetune``: the LM is frozen; its features are computed once
      (cached, see :func:`sigma_fast.data.text.text_features`; or pass ``features``) and only the
      projection is trained (as :func:`train_grounding`).
    - ``train_layers = n``: the hidden states entering the LM's last ``n`` layers are cached once
      (or pass ``inputs``); copies of those layers + the final norm + pooling + projection are
      trained, so each step runs only ``n`` layers.
    - ``finetune = "full"``: the whole LM is trained end to end, re-encoding every batch (meant
      for a GPU ``device``; warns on CPU).

    An epoch visits ``pairs_per_epoch`` pairs (default: all P; weighted draws with replacement
    when ``weights`` are given), which bounds the cost of an epoch when LM layers are trained.
    The projection learns at ``lr``; LM weights at ``lm_lr`` (default 1e-4 for ``train_layers``,
    2e-5 for ``finetune="full"``), both with Adam(W). Seeded like :func:`train_grounding`.
    """
    from .data import text as T

    if finetune not in (None, "full"):
        raise ValueError(f"finetune must be None or 'full'; got {finetune!r}")
    if train_layers < 0:
        raise ValueError(f"train_layers must be >= 0; got {train_layers}")
    if finetune == "full" and train_layers:
        raise ValueError("finetune='full' trains every layer; leave train_layers at 0")
    texts = list(texts)
    pr_t, ids, w = _check_training_inputs(len(texts), pairs, id_embeddings, weights, lam)
    gen = torch.Generator().manual_seed(seed)
    body, feats = None, None
    if finetune == "full":
        T.warn_if_cpu(device)
        tok, lm, pooling = T.load_lm(encoder, pooling=pooling, device=device)
        body = T.LMFull(lm, pooling)
        in_dim = lm.config.hidden_size
        lm_lr = 2e-5 if lm_lr is None else lm_lr
    elif train_layers:
        if inputs is None:
            inputs = T.layer_inputs(texts, encoder, train_layers, cache_dir=cache_dir,
                                    pooling=pooling, max_length=max_length, device=device,
                                    progress=progress)
        _, lm, pooling = T.load_lm(encoder, pooling=pooling)
        body = T.LMTail(lm, train_layers, pooling).to(device)
        del lm
        in_dim = inputs.hidden.shape[1]
        lm_lr = 1e-4 if lm_lr is None else lm_lr
    else:
        if features is None:
            features = T.text_features(texts, encoder, cache_dir=cache_dir, pooling=pooling,
                                       max_length=max_length, device=device, progress=progress)
            pooling = T._resolve_pooling(encoder, pooling)
        feats = torch.as_tensor(np.asarray(features, dtype=np.float32))
        in_dim = feats.shape[1]
    torch.manual_seed(seed)  # parameter init
    head = GroundingModel(in_dim, dim, hidden).to(device)
    tower = TextTower(head, body, encoder=None if encoder is None else str(encoder),
                      pooling=pooling, max_length=max_length)
    if body is None:
        opt = torch.optim.Adam(head.parameters(), lr=lr)
    else:
        tower._tokenizer = tok if finetune == "full" else None
        opt = torch.optim.AdamW([{"params": head.parameters(), "lr": lr},
                                 {"params": body.parameters(), "lr": lm_lr}], weight_decay=0.0)
    _fit(lambda idx: tower.encode_items(idx, features=feats, inputs=inputs, texts=texts),
         [tower], opt, pr_t, ids, w, epochs=epochs, batch_size=batch_size, tau=tau, lam=lam,
         gen=gen, history=head.history, device=device, progress=progress,
         pairs_per_epoch=pairs_per_epoch, desc=f"grounding ({tower.mode})")
    return tower


# ------------------------------------------------------------------------------ agreement
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
