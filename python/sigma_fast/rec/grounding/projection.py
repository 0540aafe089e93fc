"""The grounding head: a trainable down-projection of frozen text features to ``v_text``, and
the training loop every text tower shares."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ... import _threads
from ..._io import (Field, atomic_save_tensors, atomic_write_json, load_tensors,
                    read_artifact_config, recorded_digests, sha256_file)
from .losses import info_nce_loss, kd_loss

__all__ = ["GroundingModel", "train_grounding"]

_FORMAT = "sigma_fast.GroundingModel"
_FORMAT_VERSION = 2  # 2: the config records the weights' SHA-256
_CONFIG_FILE = "grounding_config.json"
_WEIGHTS_FILE = "grounding.safetensors"
_FIELDS = {"in_dim": Field("int", lo=1), "dim": Field("int", lo=1),
           "hidden": Field("int", lo=1, nullable=True, optional=True),
           "history": Field("list", optional=True)}


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
            "dim": self.dim, "hidden": self.hidden, "history": self.history,
            "files_sha256": {_WEIGHTS_FILE: sha256_file(directory / _WEIGHTS_FILE)}})
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "GroundingModel":
        directory, path, config = read_artifact_config(
            directory, _CONFIG_FILE, _FORMAT, _FORMAT_VERSION, "a grounding model", _FIELDS)
        digest = recorded_digests(config, path, [_WEIGHTS_FILE], since=2)[_WEIGHTS_FILE]
        model = cls(config["in_dim"], config["dim"], config.get("hidden"))
        try:
            model.load_state_dict(load_tensors(directory / _WEIGHTS_FILE, sha256=digest,
                                               config_path=path))
        except RuntimeError as exc:
            raise ValueError(f"{directory / _WEIGHTS_FILE} does not match {path}: {exc}") from exc
        model.history = list(config.get("history", []))
        return model.eval()


def check_training_inputs(n: int, pairs, id_embeddings, weights, lam: float):
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


def fit(encode, modules: list[nn.Module], optimizer, pr_t: torch.Tensor, ids, w, *,
         epochs: int, batch_size: int, tau: float, lam: float, gen: torch.Generator,
         history: list, device="cpu", desc: str = "grounding",
         pairs_per_epoch: int | None = None, progress: bool | None = None) -> None:
    """The grounding loop shared by every text tower: per batch of pairs ``(a, b)`` the unique
    items are embedded once by ``encode(idx) -> v_text [len(idx), dim]`` and the loss is
    ``L_CL(v_a, v_b) + lam * L_KD``. An epoch visits ``pairs_per_epoch`` pairs (default: P),
    drawn in proportion to ``w`` with replacement, or without weights the first ones of a seeded
    permutation. Per-epoch mean losses go to ``history``. Runs under
    :func:`~sigma_fast.rec.determinism.deterministic` (bit-reproducible for a seed)."""
    from tqdm.auto import tqdm

    from ..determinism import deterministic

    ids = ids.to(device) if ids is not None else None
    total = len(pr_t)
    p = total if pairs_per_epoch is None else max(1, min(int(pairs_per_epoch), total))
    steps_per_epoch = (p + batch_size - 1) // batch_size
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, unit="step", leave=False,
               disable=(not progress) if progress is not None else None)
    for m in modules:
        m.train()
    with deterministic(device):
        _fit_epochs(encode, optimizer, pr_t, ids, total, p, epochs, batch_size, tau, lam, gen,
                    history, device, w, bar)
    bar.close()
    for m in modules:
        m.eval()


def _fit_epochs(encode, optimizer, pr_t, ids, total, p, epochs, batch_size, tau, lam, gen,
                history, device, w, bar):
    for epoch in range(len(history), len(history) + epochs):
        order = (torch.randperm(total, generator=gen)[:p] if w is None
                 else torch.multinomial(w, p, replacement=True, generator=gen))
        sums = {"loss": 0.0, "cl": 0.0, "kd": 0.0}
        for start in range(0, p, batch_size):
            _threads.adapt()
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
    pr_t, ids, w = check_training_inputs(feats.shape[0], pairs, id_embeddings, weights, lam)
    torch.manual_seed(seed)  # parameter init
    gen = torch.Generator().manual_seed(seed)
    model = GroundingModel(feats.shape[1], dim, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    fit(lambda idx: model(feats[idx]), [model], opt, pr_t, ids, w, epochs=epochs,
         batch_size=batch_size, tau=tau, lam=lam, gen=gen, history=model.history,
         progress=progress)
    return model
