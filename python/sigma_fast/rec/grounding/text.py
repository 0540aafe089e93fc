"""The text tower's language model: item texts -> pooled, L2-normalised LM features, read from a
model shipped in an installed package (never downloaded), and cached on disk.

Encoders: ``"smollm2"`` (SmolLM2-135M-Instruct, a Llama-style decoder: last-token pooling of the
final, normed hidden state; converted once by :func:`sigma_fast.rec.assets.smollm2_dir`),
``"minilm"`` (all-MiniLM-L6-v2, a BERT encoder: mean pooling over real tokens), ``"hashed"``
(:func:`hashed_text_features`, no LM) or a Hugging Face model folder (decoders pool the last
token, encoders mean-pool).

Three ways to use the LM, cheapest first:

- :func:`text_features`: the frozen LM's pooled features float32 [N, H], computed once per
  (texts, encoder, pooling) and cached;
- :func:`layer_inputs` + :class:`LMTail`: the hidden states *entering* the LM's last ``n`` layers
  (per real token) are cached once; :class:`LMTail` holds copies of those ``n`` layers, the final
  norm and the pooling, so training them costs ``n`` layers per step instead of the whole LM;
- :class:`LMFull`: the whole LM, trained end to end on re-tokenized batches (meant for GPUs).

Decoders get position ids that count real tokens only (``cumsum(mask) - 1``), so a text's
features do not depend on how much left padding its batch needed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ... import _hf
from ..._io import atomic_save_tensors
from ..assets import DECODERS, ENCODERS, HASHED, encoder_dir

HASHED_DIM = 512
MAX_LENGTH = 128
_CACHE_FORMAT = "sigma_fast.text_features"
_CACHE_VERSION = 1

__all__ = ["LMFull", "LMTail", "LayerInputs", "encode_texts", "hashed_text_features",
           "layer_inputs", "load_lm", "load_tokenizer", "resolve_pooling", "text_features",
           "tokenize_texts"]


def hashed_text_features(texts: list[str], dim: int = HASHED_DIM) -> np.ndarray:
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


# --------------------------------------------------------------------------- loading the LM
def _is_decoder(config) -> bool:
    """A causal LM: a ``*ForCausalLM`` architecture, or a model type that has a causal-LM head
    but no masked-LM head (BERT has both, Llama only the first)."""
    if getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "is_decoder", False) or any(
            a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or [])):
        return True
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    kind = getattr(config, "model_type", None)
    return (kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def _default_pooling(encoder, config=None) -> str:
    if encoder in DECODERS:
        return "last"
    if encoder in ENCODERS:
        return "mean"
    return "last" if config is not None and _is_decoder(config) else "mean"


def _check_pooling(pooling: str) -> str:
    if pooling not in ("mean", "last"):
        raise ValueError(f"pooling must be 'mean' or 'last'; got {pooling!r}")
    return pooling


def load_lm(encoder: str | os.PathLike = "smollm2", *, pooling: str | None = None,
            device="cpu"):
    """``(tokenizer, model, pooling)`` for an encoder name or folder: the bare transformer
    (``AutoModel``, no LM head) in eval mode, in float32 on ``device``. Decoders get left padding
    (the last position is every row's last real token), encoders right padding."""
    _hf.offline()
    from transformers import AutoConfig, AutoModel

    if pooling is not None:
        _check_pooling(pooling)
    folder = encoder_dir(encoder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    pooling = pooling or _default_pooling(str(encoder), config)
    tok = load_tokenizer(encoder, pooling)
    model = AutoModel.from_pretrained(folder, **_hf.local_model_kwargs(torch.float32))
    model = model.to(device).eval()
    return tok, model, pooling


def load_tokenizer(encoder: str | os.PathLike, pooling: str):
    """The encoder's tokenizer, padding on the side ``pooling`` needs (left for "last")."""
    _hf.offline()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(encoder_dir(encoder), **_hf.local_tokenizer_kwargs())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left" if _check_pooling(pooling) == "last" else "right"
    return tok


def tokenize_texts(tok, texts, max_length: int, device="cpu"):
    batch = tok(list(texts), padding=True, truncation=True, max_length=max_length,
                return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items()
            if k in ("input_ids", "attention_mask", "token_type_ids")}


def _pool(hidden, mask, pooling: str):
    import torch.nn.functional as F

    if pooling == "last":  # left padding: the last position is every row's last real token
        pooled = hidden[:, -1]
    else:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return F.normalize(pooled.float(), dim=-1)


def _lm_forward(model, batch: dict, pooling: str):
    """Pooled, L2-normalised features [B, H] of a tokenized batch through the whole LM."""
    kwargs = dict(batch)
    if _is_decoder(model.config):
        kwargs["position_ids"] = _hf.position_ids(batch["attention_mask"])
    hidden = model(**kwargs).last_hidden_state
    return _pool(hidden, batch["attention_mask"], pooling)


# ---------------------------------------------------------------------- the last n layers
def _family(model) -> str:
    if all(hasattr(model, a) for a in ("layers", "norm", "rotary_emb")):
        return "decoder"
    if hasattr(model, "encoder") and hasattr(model.encoder, "layer"):
        return "bert"
    raise NotImplementedError(
        f"training the last layers supports Llama-style decoders (.layers, .norm, .rotary_emb: "
        f"Llama/SmolLM2, Mistral, Qwen2/3) and BERT-style encoders (.encoder.layer: BERT, "
        f"MiniLM); got {type(model).__name__} (model_type {model.config.model_type!r})")


def _layers(model):
    return model.layers if _family(model) == "decoder" else model.encoder.layer


def _check_n(model, n: int) -> int:
    total = len(_layers(model))
    if not 1 <= n <= total:
        raise ValueError(f"train_layers must be in [1, {total}] for this LM "
                         f"({model.config.model_type}, {total} layers); got {n}")
    return int(n)


class LMTail(nn.Module):
    """The LM's last ``n`` layers (copies), its final norm (decoders) and the pooling: hidden
    states entering layer ``L - n`` [B, T, H] + attention mask [B, T] -> pooled, L2-normalised
    features [B, H], equal to the frozen LM's features before training."""

    def __init__(self, model, n: int, pooling: str):
        super().__init__()
        self.family = _family(model)
        self.n = _check_n(model, n)
        self.pooling = _check_pooling(pooling)
        self.config = model.config
        self.layers = nn.ModuleList(copy.deepcopy(list(_layers(model)[-self.n:])))
        if self.family == "decoder":
            self.norm = copy.deepcopy(model.norm)
            self.rotary_emb = copy.deepcopy(model.rotary_emb)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

        if self.family == "decoder":
            pos = _hf.position_ids(mask)
            attn = create_causal_mask(**_hf.causal_mask_kwargs(
                create_causal_mask, config=self.config, embeds=hidden, attention_mask=mask,
                position_ids=pos))
            pe = self.rotary_emb(hidden, position_ids=pos)
            for layer in self.layers:
                hidden = layer(hidden, attention_mask=attn, position_embeddings=pe,
                               position_ids=pos)
            hidden = self.norm(hidden)
        else:
            attn = create_bidirectional_mask(config=self.config, inputs_embeds=hidden,
                                             attention_mask=mask)
            for layer in self.layers:
                hidden = layer(hidden, attention_mask=attn)
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return _pool(hidden, mask, self.pooling)

    @classmethod
    def from_config(cls, config, n: int, pooling: str) -> "LMTail":
        """An untrained tail of the right shape (for loading saved weights)."""
        from transformers import AutoModel

        cfg = copy.deepcopy(config)
        cfg.num_hidden_layers = int(n)
        return cls(AutoModel.from_config(cfg), n, pooling)


class LMFull(nn.Module):
    """The whole LM + pooling, trained end to end: tokenized batch -> pooled, L2-normalised
    features [B, H]."""

    def __init__(self, model, pooling: str):
        super().__init__()
        self.lm = model
        self.pooling = _check_pooling(pooling)

    def forward(self, batch: dict) -> torch.Tensor:
        return _lm_forward(self.lm, batch, self.pooling)


class LayerInputs(NamedTuple):
    """Hidden states entering the LM's last ``n`` layers, real tokens only: ``hidden``
    float32 [T_total, H] (texts concatenated), ``lengths`` int64 [N] (tokens per text), and the
    frozen LM's pooled features ``features`` float32 [N, H]."""

    hidden: np.ndarray
    lengths: np.ndarray
    features: np.ndarray

    def batch(self, idx, pooling: str, device="cpu"):
        """Re-padded ``(hidden [B, T, H], mask [B, T])`` tensors of texts ``idx`` (left padding for
        last-token pooling, right padding for mean pooling)."""
        idx = np.asarray(idx, dtype=np.int64)
        offsets = self.offsets
        lens = self.lengths[idx]
        t = max(int(lens.max()) if len(lens) else 0, 1)
        h = np.zeros((len(idx), t, self.hidden.shape[1]), np.float32)
        mask = np.zeros((len(idx), t), np.int64)
        for r, (i, n) in enumerate(zip(idx, lens)):
            sl = slice(t - n, t) if pooling == "last" else slice(0, n)
            h[r, sl] = self.hidden[offsets[i]:offsets[i] + n]
            mask[r, sl] = 1
        return torch.from_numpy(h).to(device), torch.from_numpy(mask).to(device)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)


def _encode(texts: list[str], encoder, pooling: str | None, *, capture: int = 0,
            batch_size: int = 64, max_length: int = MAX_LENGTH, device="cpu",
            progress: bool | None = None):
    """Frozen-LM pass: pooled features [N, H], and with ``capture = n`` the ragged hidden states
    entering the last ``n`` layers."""
    from tqdm.auto import tqdm

    tok, model, pooling = load_lm(encoder, pooling=pooling, device=device)
    captured = {}
    handle = None
    if capture:
        layer = _layers(model)[-_check_n(model, capture)]

        def grab(module, args, kwargs):
            captured["h"] = args[0] if args else kwargs["hidden_states"]

        handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    feats, chunks, lengths = [], [], []
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(texts), batch_size),
                              desc=f"encoding item texts ({Path(str(encoder)).name})",
                              unit="batch", leave=False,
                              disable=(not progress) if progress is not None else None):
                batch = tokenize_texts(tok, texts[start:start + batch_size], max_length, device)
                feats.append(_lm_forward(model, batch, pooling).cpu())
                if capture:
                    mask = batch["attention_mask"].bool().cpu()
                    h = captured.pop("h").float().cpu()
                    chunks.append(h[mask])  # row-major: each text's real tokens, in order
                    lengths.append(mask.sum(1))
    finally:
        if handle is not None:
            handle.remove()
    h = model.config.hidden_size
    features = torch.cat(feats).numpy() if feats else np.zeros((0, h), np.float32)
    if not capture:
        return features.astype(np.float32), None, pooling
    hidden = torch.cat(chunks).numpy() if chunks else np.zeros((0, h), np.float32)
    lens = torch.cat(lengths).numpy() if lengths else np.zeros((0,), np.int64)
    return (features.astype(np.float32),
            LayerInputs(hidden.astype(np.float32), lens.astype(np.int64),
                        features.astype(np.float32)), pooling)


def encode_texts(texts: list[str], *, encoder: str = "minilm", batch_size: int = 64,
                 pooling: str | None = None, progress: bool | None = None) -> np.ndarray:
    """L2-normalised text features float32 [len(texts), hidden] (never downloads, no cache).

    ``encoder``: "minilm" (all-MiniLM-L6-v2, mean pooling), "smollm2" (SmolLM2-135M-Instruct,
    last-token pooling of the final hidden state), or a Hugging Face model folder. ``pooling``
    ("mean" or "last") overrides the encoder's default. :func:`text_features` is the cached
    version.
    """
    if pooling is not None:
        _check_pooling(pooling)
    encoder_dir(encoder)  # unknown names fail before transformers is imported
    return _encode(list(texts), encoder, pooling, batch_size=batch_size, progress=progress)[0]


# ---------------------------------------------------------------------------- disk cache
def _texts_of(ds_or_texts) -> list[str]:
    texts = getattr(ds_or_texts, "item_texts", ds_or_texts)
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("expected a dataset with item_texts or a list of strings")
    return texts


def _encoder_identity(encoder) -> dict:
    """What the cached features depend on: the model folder, its config and the size and mtime
    of its weight files (hashing hundreds of MB of weights on every call would cost more than a
    cache hit saves)."""
    folder = encoder_dir(encoder).resolve()
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and (p.suffix in (".safetensors", ".bin", ".json", ".txt", ".model")):
            st = p.stat()
            files[p.name] = [st.st_size, st.st_mtime_ns]
    return {"name": str(encoder), "folder": str(folder), "files": files}


def _cache_key(texts: list[str], encoder, pooling: str, max_length: int, layer: int) -> str:
    h = hashlib.sha256()
    h.update(f"{_CACHE_FORMAT}:{_CACHE_VERSION}\n".encode())
    h.update(json.dumps({"encoder": _encoder_identity(encoder), "pooling": pooling,
                         "max_length": max_length, "layer": layer}, sort_keys=True).encode())
    for t in texts:
        b = t.encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _cache_folder(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    from ..data.dataset import default_cache_dir

    return default_cache_dir() / "text_features"


def _read_cache(path: Path, key: str, names: tuple[str, ...]):
    """The cached tensors, or None when the file is missing, unreadable or for another key."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key or not set(names) <= set(f.keys()):
                return None
            return {n: f.get_tensor(n) for n in names}
    except Exception:  # noqa: BLE001 - a corrupt cache file is rebuilt, whatever the error
        return None


def _write_cache(path: Path, key: str, tensors: dict) -> None:
    atomic_save_tensors(path, {k: torch.from_numpy(np.ascontiguousarray(v))
                               for k, v in tensors.items()},
                        metadata={"format": _CACHE_FORMAT, "key": key})


def resolve_pooling(encoder, pooling):
    if pooling is not None:
        return _check_pooling(pooling)
    if encoder in DECODERS or encoder in ENCODERS:
        return _default_pooling(encoder)
    from transformers import AutoConfig

    return _default_pooling(str(encoder), AutoConfig.from_pretrained(encoder_dir(encoder),
                                                                     trust_remote_code=False))


def text_features(ds_or_texts, encoder: str | os.PathLike = "smollm2", *,
                  cache_dir: str | os.PathLike | None = None, pooling: str | None = None,
                  batch_size: int = 64, max_length: int = MAX_LENGTH, device="cpu",
                  refresh: bool = False, progress: bool | None = None) -> np.ndarray:
    """The frozen LM's pooled, L2-normalised features float32 [N, H] of a dataset's
    ``item_texts`` (or a list of texts), computed once and cached.

    The cache file lives in ``cache_dir`` (default ``default_cache_dir() / "text_features"``),
    named by a sha256 of the texts, the encoder's identity (folder, config, weight file sizes and
    mtimes), the pooling and ``max_length``; it is written atomically, and a missing, corrupt or
    mismatching file is recomputed (``refresh=True`` forces it). ``encoder="hashed"`` returns
    :func:`hashed_text_features` (no LM, no cache).
    """
    texts = _texts_of(ds_or_texts)
    if str(encoder) == HASHED:
        return hashed_text_features(texts)
    pooling = resolve_pooling(encoder, pooling)
    key = _cache_key(texts, encoder, pooling, max_length, 0)
    path = _cache_folder(cache_dir) / f"features-{key[:24]}.safetensors"
    hit = None if refresh else _read_cache(path, key, ("features",))
    if hit is not None and hit["features"].shape[0] == len(texts):
        return hit["features"].astype(np.float32)
    feats = _encode(texts, encoder, pooling, batch_size=batch_size, max_length=max_length,
                    device=device, progress=progress)[0]
    _write_cache(path, key, {"features": feats})
    return feats


def layer_inputs(ds_or_texts, encoder: str | os.PathLike = "smollm2", n: int = 1, *,
                 cache_dir: str | os.PathLike | None = None, pooling: str | None = None,
                 batch_size: int = 64, max_length: int = MAX_LENGTH, device="cpu",
                 refresh: bool = False, progress: bool | None = None) -> LayerInputs:
    """:class:`LayerInputs` for the LM's last ``n`` layers, computed once and cached like
    :func:`text_features` (the same pass also fills the features cache)."""
    texts = _texts_of(ds_or_texts)
    if str(encoder) == HASHED:
        raise ValueError("encoder 'hashed' has no layers to train; use an LM encoder")
    pooling = resolve_pooling(encoder, pooling)
    key = _cache_key(texts, encoder, pooling, max_length, int(n))
    folder = _cache_folder(cache_dir)
    path = folder / f"layer-inputs-{key[:24]}.safetensors"
    hit = None if refresh else _read_cache(path, key, ("hidden", "lengths", "features"))
    if hit is not None and hit["lengths"].shape == (len(texts),) \
            and int(hit["lengths"].sum()) == hit["hidden"].shape[0]:
        return LayerInputs(hit["hidden"].astype(np.float32), hit["lengths"].astype(np.int64),
                           hit["features"].astype(np.float32))
    feats, inputs, _ = _encode(texts, encoder, pooling, capture=int(n), batch_size=batch_size,
                               max_length=max_length, device=device, progress=progress)
    _write_cache(path, key, inputs._asdict())
    fkey = _cache_key(texts, encoder, pooling, max_length, 0)
    _write_cache(folder / f"features-{fkey[:24]}.safetensors", fkey, {"features": feats})
    return inputs


def warn_if_cpu(device) -> None:
    if str(device).startswith("cpu"):
        warnings.warn("finetune='full' trains the whole LM and re-encodes every batch; on a CPU "
                      "this is slow (use train_layers=n to train only the last layers)",
                      RuntimeWarning, stacklevel=3)
