"""Reference recommenders to measure SIGMA against: MostPopular and SASRec.

Both rank items for :class:`~sigma_fast.data.TaskSample` s and honour each sample's allowed subset
(``sample.allowed``; None means the whole catalogue), so their rankings go straight into
:func:`sigma_fast.evaluation.evaluate_rankings`. Rankings are int64 [S, top_n], best first, padded
with -1 when a subset holds fewer than ``top_n`` items; ties go to the smaller item index.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import _threads
from .._io import (Field, atomic_save_tensors, atomic_write_json, load_tensors,
                   read_artifact_config, recorded_digests, sha256_file)

__all__ = ["MostPopular", "SASRec"]

_FORMAT = "sigma_fast.SASRec"
_FORMAT_VERSION = 2  # 2: the config records the weights' SHA-256
_CONFIG_FILE = "sasrec_config.json"
_WEIGHTS_FILE = "sasrec.safetensors"
_FIELDS = {"num_items": Field("int", lo=1), "dim": Field("int", lo=1),
           "num_blocks": Field("int", lo=1), "num_heads": Field("int", lo=1),
           "max_len": Field("int", lo=1), "dropout": Field("float", lo=0, hi=1),
           "normalize": Field("bool", optional=True),
           "history": Field("list", optional=True), "train": Field("dict", optional=True)}


def _check_top_n(top_n) -> int:
    if not isinstance(top_n, (int, np.integer)) or isinstance(top_n, bool) or top_n < 1:
        raise ValueError(f"top_n must be a positive int; got {top_n!r}")
    return int(top_n)


def _check_items(items: np.ndarray, num_items: int, what: str) -> None:
    if items.size and (items.min() < 0 or items.max() >= num_items):
        bad = items[(items < 0) | (items >= num_items)][0]
        raise ValueError(f"{what}: item index {int(bad)} is out of range for a catalogue of "
                         f"{num_items} items (expected 0 <= item < {num_items})")


def _check_dataset(ds) -> None:
    if ds.num_items == 0 or ds.num_users == 0 or ds.num_interactions == 0:
        raise ValueError(f"dataset {ds.name!r} is empty ({ds.num_users} users, {ds.num_items} "
                         f"items, {ds.num_interactions} interactions)")


# --------------------------------------------------------------------------- MostPopular

class MostPopular:
    """Ranks items by their number of training-split interactions
    (:meth:`RecDataset.train_popularity`), the same list for every user; ties go to the smaller
    item index."""

    def __init__(self, ds):
        _check_dataset(ds)
        self.num_items = ds.num_items
        self.popularity = ds.train_popularity()
        self.order = np.lexsort((np.arange(self.num_items), -self.popularity)).astype(np.int64)
        self._rank_of = np.empty(self.num_items, dtype=np.int64)
        self._rank_of[self.order] = np.arange(self.num_items)

    def rank(self, samples: Sequence, top_n: int = 20) -> np.ndarray:
        """int64 [S, top_n]: the most popular items of each sample's allowed subset."""
        top_n = _check_top_n(top_n)
        samples = list(samples)
        out = np.full((len(samples), top_n), -1, dtype=np.int64)
        cache: dict[int, np.ndarray] = {}  # samples of a task share their allowed arrays
        for i, s in enumerate(samples):
            key = -1 if s.allowed is None else id(s.allowed)
            row = cache.get(key)
            if row is None:
                if s.allowed is None:
                    row = self.order[:top_n]
                else:
                    a = np.asarray(s.allowed, dtype=np.int64)
                    _check_items(a, self.num_items, f"sample {i} allowed subset")
                    a = np.unique(a)
                    row = a[np.argsort(self._rank_of[a], kind="stable")[:top_n]]
                cache[key] = row
            out[i, :len(row)] = row
        return out


# -------------------------------------------------------------------------------- SASRec

class _Block(nn.Module):
    """Pre-LN transformer block: x + MHA(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, dim)
        self.ff2 = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.p = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True,
                                           dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.ff2(self.drop(F.gelu(self.ff1(self.ln2(x))))))


class SASRec(nn.Module):
    """SASRec (Kang & McAuley, 2018): self-attentive sequential recommendation.

    Item embedding + learned positional embedding -> ``num_blocks`` causal pre-LN self-attention
    blocks -> final LayerNorm; the score of item i after a prefix is the dot product of the last
    hidden state with item i's embedding (input and output embeddings are shared; with
    ``normalize``, both are L2-normalised first, so the score is their cosine). Sequences are
    left-aligned in a window of ``max_len`` and padded on the right (token 0 is padding, item i
    is token i + 1), so an item's positional embedding is its place in the window both in
    training and at ranking time; with causal attention no real position ever sees padding.
    """

    def __init__(self, num_items: int, dim: int = 64, num_blocks: int = 2, num_heads: int = 2,
                 max_len: int = 50, dropout: float = 0.2, *, normalize: bool = False,
                 device: str | torch.device = "cpu"):
        super().__init__()
        for name, value in (("num_items", num_items), ("dim", dim), ("num_blocks", num_blocks),
                            ("num_heads", num_heads), ("max_len", max_len)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
        self.num_items, self.dim, self.num_blocks = int(num_items), int(dim), int(num_blocks)
        self.num_heads, self.max_len, self.dropout = int(num_heads), int(max_len), float(dropout)
        if not isinstance(normalize, (bool, np.bool_)):
            raise ValueError(f"normalize must be a bool; got {normalize!r}")
        self.normalize = bool(normalize)
        self.item_emb = nn.Embedding(self.num_items + 1, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(self.max_len, dim)
        self.emb_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(dim, num_heads, dropout) for _ in range(num_blocks))
        self.ln = nn.LayerNorm(dim)
        self.history: list[dict] = []
        self.train_settings: dict = {}  # what fit() was called with
        self._reset(0)
        self.to(device)

    @property
    def device(self) -> torch.device:
        return self.item_emb.weight.device

    def config(self) -> dict:
        return {"num_items": self.num_items, "dim": self.dim, "num_blocks": self.num_blocks,
                "num_heads": self.num_heads, "max_len": self.max_len, "dropout": self.dropout,
                "normalize": self.normalize}

    @property
    def item_init_std(self) -> float:
        """Standard deviation of the initial item vectors. Cosine scores see a vector's
        direction only, and Adam moves each coordinate by about lr a step whatever its scale,
        so an item turns by about lr·√dim / ‖e‖ a step: vectors of norm ≈ 1 (std dim^-½, kept
        for dot-product scores) stayed near their random directions for epochs on ML-1M. With
        ``normalize`` they start at std 0.02 (the published recipe; truncated at 2 std)."""
        return 0.02 if self.normalize else self.dim ** -0.5

    def _reset(self, seed: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Embedding):
                    nn.init.normal_(m.weight, std=self.dim ** -0.5)
                elif isinstance(m, nn.LayerNorm):
                    m.reset_parameters()
            if self.normalize:
                std = self.item_init_std
                nn.init.trunc_normal_(self.item_emb.weight, std=std, a=-2 * std, b=2 * std)
            with torch.no_grad():
                self.item_emb.weight[0].zero_()

    # ------------------------------------------------------------------ model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens int64 [B, L] (item i = i + 1, left-aligned, 0 = padding after the items,
        L <= max_len) -> hidden states float32 [B, L, dim]; position t depends on tokens <= t."""
        b, n = tokens.shape
        if n > self.max_len:
            raise ValueError(f"tokens hold {n} positions; this SASRec has max_len {self.max_len}")
        pos = torch.arange(n, device=tokens.device)
        x = self.item_emb(tokens) * (self.dim ** 0.5) + self.pos_emb(pos)
        keep = (tokens != 0).unsqueeze(-1)
        x = self.emb_drop(x) * keep
        for block in self.blocks:
            x = block(x) * keep
        return self.ln(x)

    def item_logits(self, hidden: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of every item (or of the item indices ``items`` [K]), float32 [..., N or K]."""
        table = self.item_emb.weight[1:] if items is None else self.item_emb.weight[items + 1]
        return self._unit(hidden) @ self._unit(table).T

    def _unit(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the scoring space: L2-normalised rows with ``normalize``, else as is."""
        return F.normalize(x, dim=-1, eps=1e-6) if self.normalize else x

    # --------------------------------------------------------------- training

    def _windows(self, ds) -> tuple[torch.Tensor, torch.Tensor]:
        """Every training sequence cut into left-aligned windows of max_len + 1 items, from its
        end backwards, so each training transition is predicted exactly once: inputs are the
        window's first items, targets the next ones (-100 where padding)."""
        L = self.max_len
        inputs, targets = [], []
        for u in range(ds.num_users):
            seq = np.asarray(ds.train_sequence(u), dtype=np.int64)
            end = len(seq)
            while end >= 2:
                w = seq[max(0, end - L - 1):end]
                x = np.zeros(L, np.int64)
                y = np.full(L, -100, np.int64)
                x[:len(w) - 1] = w[:-1] + 1
                y[:len(w) - 1] = w[1:]
                inputs.append(x)
                targets.append(y)
                end -= L
        if not inputs:
            raise ValueError(f"dataset {ds.name!r} has no user with at least two training "
                             f"interactions: nothing to train SASRec on")
        return torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(targets))

    def fit(self, ds, epochs: int = 20, batch_size: int = 128, lr: float = 1e-3, *,
            weight_decay: float = 0.0, seed: int = 0, progress: bool | None = None,
            valid: bool = True, loss: str = "softmax", num_negatives: int = 128,
            temperature: float = 1.0) -> "SASRec":
        """Train from a fresh seeded initialisation on ``ds``'s training split only: every
        position of every training sequence predicts the next item, Adam, shuffled windows.
        ``loss="softmax"`` is cross-entropy over the whole catalogue; ``loss="sampled"`` is a
        sampled softmax over the target and ``num_negatives`` items drawn uniformly for each
        training sequence (shared by its positions; a draw equal to a position's target is
        masked out for that position). Logits are divided by ``temperature`` (with ``normalize``, a
        cosine over a temperature such as 0.05). With ``valid``, each epoch also measures
        JustForYou HR@10 and NDCG@10 on the validation targets and the weights of the epoch with
        the best NDCG@10 are kept (ties: the later epoch). ``self.history`` records each epoch's
        loss (and validation metrics). Deterministic for a
        seed on a given device."""
        from tqdm.auto import tqdm

        _check_dataset(ds)
        if ds.num_items != self.num_items:
            raise ValueError(f"dataset {ds.name!r} has {ds.num_items} items; this SASRec was "
                             f"built for {self.num_items}")
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive int; got {epochs!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        if loss not in ("softmax", "sampled"):
            raise ValueError(f"loss must be 'softmax' or 'sampled'; got {loss!r}")
        if not isinstance(num_negatives, int) or isinstance(num_negatives, bool) \
                or num_negatives < 1:
            raise ValueError(f"num_negatives must be a positive int; got {num_negatives!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")
        _check_items(np.asarray(ds.seq_items), self.num_items, f"dataset {ds.name!r}")
        x_all, y_all = self._windows(ds)
        valid_samples = self._valid_samples(ds) if valid else []
        device = self.device
        self._reset(seed)
        self.history = []
        self.train_settings = {"epochs": epochs, "batch_size": batch_size, "lr": float(lr),
                               "weight_decay": float(weight_decay), "seed": seed, "loss": loss,
                               "num_negatives": num_negatives,
                               "temperature": float(temperature),
                               "item_init_std": self.item_init_std}
        opt = torch.optim.Adam(self.parameters(), lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        n = len(x_all)
        steps = (n + batch_size - 1) // batch_size
        bar = tqdm(total=epochs * steps, desc="SASRec", unit="step", leave=False,
                   disable=(not progress) if progress is not None else None)
        best, best_state = -1.0, None
        from .determinism import deterministic

        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                deterministic(device):
            torch.manual_seed(seed)  # dropout
            for epoch in range(epochs):
                self.train()
                perm = torch.randperm(n, generator=gen)
                total, count = 0.0, 0
                for start in range(0, n, batch_size):
                    _threads.adapt()
                    idx = perm[start:start + batch_size]
                    x, y = x_all[idx].to(device), y_all[idx].to(device)
                    keep = y >= 0
                    hidden = self(x)
                    if loss == "softmax":
                        step_loss = F.cross_entropy(self.item_logits(hidden[keep]) / temperature,
                                                    y[keep])
                    else:
                        step_loss = self._sampled_softmax(hidden, y, num_negatives,
                                                          temperature, gen)
                    opt.zero_grad()
                    step_loss.backward()
                    opt.step()
                    total += step_loss.item() * int(keep.sum())
                    count += int(keep.sum())
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{step_loss.item():.4f}",
                                    refresh=False)
                record = {"epoch": epoch + 1, "loss": total / max(count, 1)}
                if valid_samples:
                    record.update(self._validate(valid_samples))
                    # NDCG@10 separates epochs that HR@10 ties (small catalogues); a tie goes to
                    # the later, longer-trained epoch.
                    if record["valid_ndcg@10"] >= best:
                        best = record["valid_ndcg@10"]
                        best_state = copy.deepcopy(self.state_dict())
                self.history.append(record)
        bar.close()
        if best_state is not None:
            self.load_state_dict(best_state)
        return self.eval()

    def _sampled_softmax(self, hidden: torch.Tensor, y: torch.Tensor, num_negatives: int,
                         temperature: float, gen: torch.Generator) -> torch.Tensor:
        """Mean cross-entropy of each target against ``num_negatives`` uniform draws.

        hidden float [B, L, dim]; y int64 [B, L] targets, -100 where padding. Every sequence
        draws its own negatives, shared by its positions (a draw equal to a position's target
        is masked out there), so a step of B sequences touches B × num_negatives items."""
        b = hidden.shape[0]
        negatives = torch.randint(self.num_items, (b, num_negatives), generator=gen)
        negatives = negatives.to(hidden.device)
        target = y.clamp(min=0)
        h = self._unit(hidden)
        pos_e = self._unit(self.item_emb(target + 1))
        neg_e = self._unit(self.item_emb(negatives + 1))
        pos = (h * pos_e).sum(-1)                                  # [B, L]
        neg = torch.bmm(h, neg_e.transpose(1, 2))                  # [B, L, num_negatives]
        neg = neg.masked_fill(negatives[:, None, :] == target[..., None], float("-inf"))
        logits = torch.cat([pos.unsqueeze(-1), neg], dim=-1) / temperature
        keep = y >= 0
        logits = logits[keep]
        return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long,
                                                   device=logits.device))

    def _validate(self, samples) -> dict:
        ranks = self.rank(samples, top_n=10)
        targets = np.array([s.target for s in samples])[:, None]
        hit = ranks == targets
        gain = (hit / np.log2(np.arange(2, 12))).sum(1)
        return {"valid_hr@10": float(hit.any(1).mean()), "valid_ndcg@10": float(gain.mean())}

    @staticmethod
    def _valid_samples(ds) -> list:
        from .data.tasks import iter_task_samples

        return list(iter_task_samples(ds, "valid", ("JustForYou",)))

    # ---------------------------------------------------------------- ranking

    @torch.no_grad()
    def rank(self, samples: Sequence, top_n: int = 20, batch_size: int = 256) -> np.ndarray:
        """int64 [S, top_n]: items by score after ``sample.history`` (its last ``max_len``
        items), restricted to the sample's allowed subset, best first; ties go to the smaller
        item index; -1 pads rows whose subset holds fewer than ``top_n`` items."""
        top_n = _check_top_n(top_n)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        samples = list(samples)
        out = np.full((len(samples), top_n), -1, dtype=np.int64)
        was_training = self.training
        self.eval()
        device, L, k = self.device, self.max_len, min(top_n, self.num_items)
        try:
            for start in range(0, len(samples), batch_size):
                _threads.adapt()
                chunk = samples[start:start + batch_size]
                tokens = np.zeros((len(chunk), L), np.int64)
                last = np.zeros(len(chunk), np.int64)  # position of the newest history item
                allow = None
                for r, s in enumerate(chunk):
                    h = np.asarray(s.history, dtype=np.int64)[-L:]
                    _check_items(h, self.num_items, f"sample {start + r} history")
                    if len(h):
                        tokens[r, :len(h)] = h + 1
                        last[r] = len(h) - 1
                    if s.allowed is not None:
                        a = np.asarray(s.allowed, dtype=np.int64)
                        _check_items(a, self.num_items, f"sample {start + r} allowed subset")
                        if allow is None:
                            allow = torch.zeros(len(chunk), self.num_items, dtype=torch.bool)
                            allow[:r] = True
                        allow[r, torch.from_numpy(a)] = True
                    elif allow is not None:
                        allow[r] = True
                hidden = self(torch.from_numpy(tokens).to(device))
                hidden = hidden[torch.arange(len(chunk), device=device),
                                torch.from_numpy(last).to(device)]
                logits = self.item_logits(hidden)
                logits = logits.float()
                if allow is not None:
                    allow = allow.to(device)
                    logits = logits.masked_fill(~allow, float("-inf"))
                # A stable descending sort keeps the smaller item index first among ties.
                scores, items = torch.sort(logits, dim=1, descending=True, stable=True)
                items = items[:, :k].cpu().numpy()
                valid = torch.isfinite(scores[:, :k]).cpu().numpy()
                if allow is not None:
                    valid &= np.take_along_axis(allow.cpu().numpy(), items, 1)
                out[start:start + len(chunk), :k] = np.where(valid, items, -1)
        finally:
            self.train(was_training)
        return out

    # ------------------------------------------------------------------- save

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``sasrec.safetensors`` (weights) and ``sasrec_config.json`` (shape and training
        history) into ``directory``, each replaced atomically."""
        directory = Path(directory)
        atomic_save_tensors(directory / _WEIGHTS_FILE, self.state_dict(),
                            metadata={"format": _FORMAT})
        atomic_write_json(directory / _CONFIG_FILE, {
            "format": _FORMAT, "format_version": _FORMAT_VERSION, **self.config(),
            "history": self.history, "train": self.train_settings,
            "files_sha256": {_WEIGHTS_FILE: sha256_file(directory / _WEIGHTS_FILE)}})
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, *,
             device: str | torch.device = "cpu") -> "SASRec":
        directory, path, config = read_artifact_config(
            directory, _CONFIG_FILE, _FORMAT, _FORMAT_VERSION, "a SASRec model", _FIELDS)
        digest = recorded_digests(config, path, [_WEIGHTS_FILE], since=2)[_WEIGHTS_FILE]
        try:
            model = cls(config["num_items"], config["dim"], config["num_blocks"],
                        config["num_heads"], config["max_len"], float(config["dropout"]),
                        normalize=bool(config.get("normalize", False)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: malformed SASRec config: {exc}") from exc
        try:
            model.load_state_dict(load_tensors(directory / _WEIGHTS_FILE, sha256=digest,
                                               config_path=path))
        except RuntimeError as exc:
            raise ValueError(f"{directory / _WEIGHTS_FILE} does not match {path}: {exc}") from exc
        model.history = list(config.get("history", []))
        model.train_settings = dict(config.get("train", {}))
        return model.to(device).eval()
