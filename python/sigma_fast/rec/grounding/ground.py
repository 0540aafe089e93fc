"""Multi-view grounding of a :class:`RecDataset`: the glue between the dataset layer and the
array-level functions of this package (views, teacher, text tower, metrics).

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

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..._io import (Field, atomic_save_tensors, atomic_write_json, load_tensors,
                    read_artifact_config, recorded_digests, sha256_file)
from ..data.dataset import RecDataset
from .metrics import agreement_report
from .teacher import train_bpr
from .text import layer_inputs, text_features
from .tower import TextTower, train_text_tower
from .views import attribute_pairs, co_interaction_pairs, merge_views, neighbour_pairs

_FORMAT = "sigma_fast.GroundingResult"
_FORMAT_VERSION = 2  # 2: the config records the embeddings' SHA-256
_CONFIG_FILE = "grounding_result.json"
_ARRAYS_FILE = "embeddings.safetensors"
_FIELDS = {"agreement": Field("dict"), "k": Field("int", lo=1)}


@dataclass
class GroundingResult:
    model: object                 # sigma_fast.rec.grounding.GroundingModel (the tower's head)
    grounded: np.ndarray          # float32 [I, dim], unit rows
    id_embeddings: np.ndarray     # float32 [I, d_id], the frozen teacher (BPR, or a given table)
    agreement: dict               # {"text": r, "id": r, "grounded": r} recall@k on held-out pairs
    k: int
    text_features: np.ndarray | None = None  # float32 [I, H], the frozen LM's raw features
    tower: object | None = None   # sigma_fast.rec.grounding.TextTower (head + trained LM part)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the tower (``tower/``, see :meth:`TextTower.save`), the embedding tables
        (``embeddings.safetensors``) and ``grounding_result.json`` (agreement, k), atomically
        file by file, the config last."""
        import torch

        directory = Path(directory)
        tower = self.tower if self.tower is not None else TextTower(self.model)
        tower.save(directory / "tower")
        arrays = {"grounded": self.grounded, "id_embeddings": self.id_embeddings}
        if self.text_features is not None:
            arrays["text_features"] = self.text_features
        atomic_save_tensors(directory / _ARRAYS_FILE,
                            {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
                             for k, v in arrays.items()}, metadata={"format": _FORMAT})
        atomic_write_json(directory / _CONFIG_FILE, {
            "format": _FORMAT, "format_version": _FORMAT_VERSION,
            "agreement": self.agreement, "k": self.k,
            "files_sha256": {_ARRAYS_FILE: sha256_file(directory / _ARRAYS_FILE)}})
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device="cpu") -> "GroundingResult":
        directory, path, config = read_artifact_config(
            directory, _CONFIG_FILE, _FORMAT, _FORMAT_VERSION, "a grounding result", _FIELDS)
        digest = recorded_digests(config, path, [_ARRAYS_FILE], since=2)[_ARRAYS_FILE]
        tower = TextTower.load(directory / "tower", device=device)
        tensors = load_tensors(directory / _ARRAYS_FILE, sha256=digest, config_path=path)
        for name in ("grounded", "id_embeddings"):
            if name not in tensors:
                raise ValueError(f"{directory / _ARRAYS_FILE}: incomplete grounding result, "
                                 f"missing tensor {name!r}")
        n = tensors["grounded"].shape[0]
        for name, t in tensors.items():
            if t.dtype.is_floating_point is False or t.dim() != 2 or t.shape[0] != n:
                raise ValueError(f"{directory / _ARRAYS_FILE}: {name} must be a float [{n}, "
                                 f"dim] table; got {str(t.dtype)} {list(t.shape)}")
        arrays = {k: v.numpy() for k, v in tensors.items()}
        return cls(model=tower.head, grounded=arrays["grounded"],
                   id_embeddings=arrays["id_embeddings"], agreement=dict(config["agreement"]),
                   k=config["k"], text_features=arrays.get("text_features"), tower=tower)


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


def ground_dataset(ds: RecDataset, features: np.ndarray | None = None, *,
                   encoder: str | os.PathLike = "minilm", train_layers: int = 0,
                   finetune: str | None = None, device="cpu", cache_dir=None, dim: int = 64,
                   epochs: int = 10, batch_size: int = 256, lr: float = 1e-3,
                   lm_lr: float | None = None, pairs_per_epoch: int | None = None,
                   tau: float = 0.05, lam: float = 1.0,
                   id_dim: int = 64, id_epochs: int = 10, window: int = 3, k_attr: int = 10,
                   k_sem: int = 10, k_eval: int = 20, seed: int = 0,
                   id_embeddings: np.ndarray | None = None,
                   progress: bool | None = None) -> GroundingResult:
    """Build the views, train the BPR teacher and the text tower, and report the held-out
    agreement (see the module docstring).

    Text features: ``features`` [num_items, H] when given (only the projection is trained);
    otherwise the frozen ``encoder``'s features of ``ds.item_texts`` (cached on disk under
    ``cache_dir``, see :func:`~sigma_fast.rec.grounding.text.text_features`). ``train_layers
    = n`` also trains the LM's last ``n`` layers (from cached hidden states), ``finetune = "full"`` the
    whole LM (meant for a GPU ``device``); see :func:`train_text_tower`.
    The frozen features feed the semantic view and the "text" row of the report, and are kept in
    ``result.text_features`` (the "without grounding" ablation).

    ``id_embeddings`` float [num_items, d]: a collaborative table to use as the teacher (e.g. the
    item embeddings of a trained sequential model) instead of training BPR (``id_dim`` and
    ``id_epochs`` are then unused).
    """
    if id_embeddings is not None:
        id_embeddings = np.asarray(id_embeddings)
        if (id_embeddings.ndim != 2 or id_embeddings.shape[0] != ds.num_items
                or not np.issubdtype(id_embeddings.dtype, np.floating)):
            raise ValueError(f"id_embeddings must be a float [num_items = {ds.num_items}, d] "
                             f"table; got {id_embeddings.dtype} {list(id_embeddings.shape)}")
        if not np.isfinite(id_embeddings).all():
            raise ValueError("id_embeddings must be finite; got NaN or infinite values")
    inputs = None
    if features is not None:
        if train_layers or finetune:
            raise ValueError("features are the frozen LM's output; train_layers and finetune "
                             "need the encoder instead (leave features=None)")
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] != ds.num_items:
            raise ValueError(f"features must be [num_items = {ds.num_items}, H]; got shape "
                             f"{list(features.shape)}")
        encoder = None
    elif train_layers and not finetune:
        inputs = layer_inputs(ds, encoder, train_layers, cache_dir=cache_dir, device=device,
                              progress=progress)
        features = inputs.features
    else:
        features = text_features(ds, encoder, cache_dir=cache_dir, device=device,
                                 progress=progress)
    users, items, times = training_interactions(ds)
    views = [co_interaction_pairs(users, items, times, num_items=ds.num_items, window=window)]
    if ds.item_genre_mask is not None and ds.item_genre_mask.shape[1]:
        years = np.asarray(ds.item_years)
        views.append(attribute_pairs(ds.item_genre_mask, np.where(years >= 0, years, -1),
                                     k=k_attr))
    views.append(neighbour_pairs(features, k=k_sem))
    view = merge_views(*views)
    if id_embeddings is not None:
        id_emb = id_embeddings.astype(np.float32)
    else:
        id_emb = train_bpr(users, items, num_users=ds.num_users, num_items=ds.num_items,
                           dim=id_dim, epochs=id_epochs, seed=seed, progress=progress)
    tower = train_text_tower(ds.item_texts, view.pairs, id_emb, encoder=encoder,
                             train_layers=train_layers, finetune=finetune,
                             weights=view.weights, dim=dim, epochs=epochs,
                             batch_size=batch_size, lr=lr, lm_lr=lm_lr,
                             pairs_per_epoch=pairs_per_epoch, tau=tau, lam=lam,
                             device=device, cache_dir=cache_dir, seed=seed,
                             features=features, inputs=inputs, progress=progress)
    grounded = tower.embed(features=features, inputs=inputs, texts=ds.item_texts)
    report = agreement_report(held_out_pairs(ds), k_eval, text=features, id=id_emb,
                              grounded=grounded)
    return GroundingResult(model=tower.head, grounded=grounded, id_embeddings=id_emb,
                           agreement=report, k=k_eval, text_features=features, tower=tower)

