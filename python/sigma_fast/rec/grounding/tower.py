"""The trainable text tower: frozen LM features, the LM's last layers, or the whole LM, under the
grounding head (:class:`TextTower`, :func:`train_text_tower`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..._io import (Field, atomic_save_tensors, atomic_write_json, load_tensors,
                    read_artifact_config, recorded_digests, sha256_file)
from . import text as T
from .projection import GroundingModel, check_training_inputs, fit

__all__ = ["TextTower", "train_text_tower"]

_TOWER_FORMAT = "sigma_fast.TextTower"
_TOWER_VERSION = 2  # 2: the config records the body weights' SHA-256
_TOWER_CONFIG = "tower_config.json"
_TOWER_BODY = "body.safetensors"
_TOWER_FIELDS = {"mode": Field("str", choices=("frozen", "layers", "full")),
                 "encoder": Field("str", nullable=True, optional=True),
                 "pooling": Field("str", choices=("mean", "last"), nullable=True, optional=True),
                 "max_length": Field("int", lo=1, optional=True),
                 "lm_config": Field("dict", optional=True),
                 "train_layers": Field("int", lo=1, nullable=True, optional=True)}


class TextTower(nn.Module):
    """The whole text tower: item text -> [LM body] -> pooled, L2-normalised LM features ->
    ``head`` (:class:`GroundingModel`: down-projection + L2 normalisation) -> ``v_text``.

    ``mode`` says what the body is and what it reads:

    - ``"frozen"``: no body; the head reads cached frozen features
      (:func:`~sigma_fast.rec.grounding.text.text_features`);
    - ``"layers"``: an :class:`~sigma_fast.rec.grounding.text.LMTail` (the LM's last ``n``
      layers, final norm, pooling) reading the cached hidden states entering those layers
      (:func:`~sigma_fast.rec.grounding.text.layer_inputs`);
    - ``"full"``: an :class:`~sigma_fast.rec.grounding.text.LMFull` (the whole LM) reading
      tokenized text.
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
            self._tokenizer = T.load_tokenizer(self.encoder, self.pooling)
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
        batch = T.tokenize_texts(self.tokenizer(), [texts[i] for i in idx.tolist()],
                                 self.max_length, dev)
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
        texts = list(texts)
        if self.encoder is None:
            raise ValueError("this tower was trained on precomputed features (no encoder); "
                             "embed items with tower.embed(features=...) instead")
        dev = self._device()
        if self.mode == "frozen":
            feats = T.text_features(texts, self.encoder, cache_dir=cache_dir, pooling=self.pooling,
                                  max_length=self.max_length, batch_size=batch_size,
                                  device=dev, progress=progress)
            return self.embed(features=feats)
        if self.mode == "layers":
            inputs = T.layer_inputs(texts, self.encoder, self.body.n, cache_dir=cache_dir,
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
            config["files_sha256"] = {_TOWER_BODY: sha256_file(directory / _TOWER_BODY)}
        atomic_write_json(directory / _TOWER_CONFIG, config)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device="cpu") -> "TextTower":
        directory, path, config = read_artifact_config(
            directory, _TOWER_CONFIG, _TOWER_FORMAT, _TOWER_VERSION, "a text tower",
            _TOWER_FIELDS)
        head = GroundingModel.load(directory / "head")
        mode = config.get("mode")
        body = None
        if mode in ("layers", "full"):
            for key, kind in (("lm_config", "dict"), ("pooling", "str")):
                if not isinstance(config.get(key), dict if kind == "dict" else str):
                    raise ValueError(f"{path}: field {key!r} is required for mode {mode!r}")
            if mode == "layers" and not isinstance(config.get("train_layers"), int):
                raise ValueError(f"{path}: field 'train_layers' (an int >= 1) is required for "
                                 f"mode 'layers'")
            digest = recorded_digests(config, path, [_TOWER_BODY], since=2)[_TOWER_BODY]
            from transformers import AutoConfig, AutoModel

            try:
                d = dict(config["lm_config"])
                lm_config = AutoConfig.for_model(d.pop("model_type"), **d)
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}: malformed lm_config: {exc}") from exc
            if mode == "layers":
                body = T.LMTail.from_config(lm_config, int(config["train_layers"]),
                                          config["pooling"])
            else:
                body = T.LMFull(AutoModel.from_config(lm_config), config["pooling"])
            try:
                body.load_state_dict(load_tensors(directory / _TOWER_BODY, sha256=digest,
                                                  config_path=path))
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
      (cached, see :func:`~sigma_fast.rec.grounding.text.text_features`; or pass
      ``features``) and only the projection is trained (as :func:`train_grounding`).
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
    if finetune not in (None, "full"):
        raise ValueError(f"finetune must be None or 'full'; got {finetune!r}")
    if train_layers < 0:
        raise ValueError(f"train_layers must be >= 0; got {train_layers}")
    if finetune == "full" and train_layers:
        raise ValueError("finetune='full' trains every layer; leave train_layers at 0")
    texts = list(texts)
    pr_t, ids, w = check_training_inputs(len(texts), pairs, id_embeddings, weights, lam)
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
            pooling = T.resolve_pooling(encoder, pooling)
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
    fit(lambda idx: tower.encode_items(idx, features=feats, inputs=inputs, texts=texts),
         [tower], opt, pr_t, ids, w, epochs=epochs, batch_size=batch_size, tau=tau, lam=lam,
         gen=gen, history=head.history, device=device, progress=progress,
         pairs_per_epoch=pairs_per_epoch, desc=f"grounding ({tower.mode})")
    return tower
