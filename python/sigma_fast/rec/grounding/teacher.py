"""The collaborative teacher: BPR matrix factorisation whose item table is the frozen ID
embedding that ``L_KD`` distils into the text space."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ... import _threads
from .views import as_index_array

__all__ = ["train_bpr"]


def train_bpr(users, items, *, num_users: int | None = None, num_items: int | None = None,
              dim: int = 64, epochs: int = 5, batch_size: int = 1024, lr: float = 0.01,
              l2: float = 1e-4, seed: int = 0, progress: bool | None = None) -> np.ndarray:
    """BPR matrix factorisation on training (user, item) pairs; returns the item table
    float32 [num_items, dim] (the frozen collaborative ID embeddings).

    Each epoch visits every interaction once in a seeded random order, with one uniformly drawn
    negative item per positive (redrawn once if it is one of the user's positives), and minimises
    ``-log sigmoid(<p_u, q_i> - <p_u, q_j>) + l2 * (|p_u|^2 + |q_i|^2 + |q_j|^2)`` with Adam.
    Bit-reproducible for a seed on a given machine (runs under
    :func:`~sigma_fast.rec.determinism.deterministic`).
    """
    from tqdm.auto import tqdm

    from ..determinism import deterministic

    users = as_index_array(users, "users")
    items = as_index_array(items, "items")
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
    with deterministic():
        _bpr_epochs(p, q, opt, u_t, i_t, positives, ni, m, epochs, batch_size, l2, gen, bar)
    bar.close()
    return q.detach().numpy().astype(np.float32)


def _bpr_epochs(p, q, opt, u_t, i_t, positives, ni, m, epochs, batch_size, l2, gen, bar):
    for _ in range(epochs):
        perm = torch.randperm(m, generator=gen)
        for start in range(0, m, batch_size):
            _threads.adapt()
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
