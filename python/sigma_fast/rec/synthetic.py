"""Synthetic catalogues and randomly initialised SIGMA models, for tests and for timing where no
dataset or pretrained model is installed (e.g. a GPU machine without network access).

>>> ds = synthetic_dataset("/tmp/syn", num_items=1664, num_users=943)   # a RecDataset
>>> model = synthetic_model(ds, shape="smollm2-135m")                   # random SmolLM2 shapes

The catalogue's atomic files look like MovieLens-100K's (titles with years, genres, user
profiles, timestamps), so every one of the seven tasks has samples and prompts have realistic
lengths (about 85 tokens with 20 history items). The tokenizer is a word-level tokenizer built
from the catalogue's texts and the task templates; the model's weights are random, so results
measure compute, never accuracy.
"""

from __future__ import annotations

import calendar
import datetime as dt
import os
import re
from pathlib import Path

import numpy as np

__all__ = ["SHAPES", "synthetic_dataset", "synthetic_model", "word_tokenizer"]

GENRES = ("Action", "Adventure", "Animation", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
          "Western")
OCCUPATIONS = ("student", "engineer", "writer", "artist", "doctor", "technician", "librarian",
               "educator", "programmer", "other")
WORDS = ("night", "river", "city", "star", "dream", "shadow", "heart", "road", "storm", "king",
         "garden", "winter", "fire", "ocean", "secret", "journey", "mirror", "summer", "ghost",
         "island", "letter", "train", "forest", "moon")

# Backbone shapes (hidden, layers, heads, key-value heads, MLP width): SmolLM2-135M's, and small.
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, rope_theta=100000.0),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=256, rope_theta=10000.0),
}


def _write(path: Path, header: list[str], rows) -> None:
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n"
                                                        for r in rows))


def synthetic_dataset(folder: str | os.PathLike, *, num_items: int = 1664, num_users: int = 943,
                      min_length: int = 20, max_length: int = 60, seed: int = 0,
                      max_history: int = 20):
    """Write MovieLens-like atomic files into ``folder`` and load them (no cache): users watch
    runs of related items (a genre-coherent random walk), so sequences have structure."""
    from .data import load_dataset

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    genres = [sorted(rng.choice(len(GENRES), size=int(rng.integers(1, 4)), replace=False))
              for _ in range(num_items)]
    items = []
    for i in range(num_items):
        words = " ".join(WORDS[j] for j in rng.choice(len(WORDS), size=int(rng.integers(1, 4))))
        items.append((f"i{i}", f"The {words} {i} ({1950 + int(rng.integers(50))})",
                      " ".join(GENRES[g] for g in genres[i])))
    _write(folder / "syn.item", ["item_id:token", "movie_title:token", "genre:token_seq"], items)
    _write(folder / "syn.user", ["user_id:token", "age:token", "gender:token",
                                 "occupation:token"],
           [(f"u{u}", int(rng.integers(18, 70)), "MF"[int(rng.integers(2))],
             OCCUPATIONS[int(rng.integers(len(OCCUPATIONS)))]) for u in range(num_users)])
    base = calendar.timegm(dt.date(1997, 9, 1).timetuple())
    rows = []
    for u in range(num_users):
        length = int(rng.integers(min_length, max_length + 1))
        item = int(rng.integers(num_items))
        t = base + int(rng.integers(0, 200 * 86400))
        for _ in range(length):
            rows.append((f"u{u}", f"i{item}", t))
            t += int(rng.integers(3600, 5 * 86400))
            item = int((item + rng.integers(1, 40)) % num_items)
    _write(folder / "syn.inter", ["user_id:token", "item_id:token", "timestamp:float"], rows)
    return load_dataset(folder, cache_dir=False, max_history=max_history)


def word_tokenizer(texts, extra=()):
    """A word-level Hugging Face tokenizer (``PreTrainedTokenizerFast``) whose vocabulary is
    every lower-cased word and punctuation mark of ``texts`` (plus ``extra`` words), with
    ``[PAD]``, ``[UNK]`` and ``[BOS]`` tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2}
    for text in list(texts) + list(extra):
        for w in re.findall(r"\w+|[^\w\s]", text.lower()):
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]")


def synthetic_model(ds, *, shape: str | dict = "tiny", mode: str = "sigma",
                    prefix_len: int | None = None,
                    num_levels: int = 4, codebook_size: int | None = None, seed: int = 0,
                    items=None, **config):
    """A randomly initialised ``SigmaModel`` over dataset ``ds``: a Llama backbone of ``shape``
    (a name of :data:`SHAPES` or a dict of LlamaConfig sizes), the word-level tokenizer of the
    dataset's texts and the task templates, and semantic IDs from RQ of hashed text features
    with ``prefix_len`` prefix levels (default 1), or those of ``items`` (a fitted
    ``HybridItemTokenizer``; pass ``items.variant()`` for a model with its own Proj&Fuse)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .data.tasks import TEMPLATES
    from .grounding import hashed_text_features
    from .model import SigmaConfig, SigmaModel
    from .tokenization import HybridItemTokenizer

    sizes = SHAPES[shape] if isinstance(shape, str) else dict(shape)
    texts = list(ds.item_texts) + [t for ts in TEMPLATES.values() for t in ts]
    texts += [f"{k} {v}" for p in ds.user_profiles for k, v in p.items()]
    tok = word_tokenizer(texts, extra=["user profile", "the user's history, oldest first",
                                       *GENRES, "spring summer autumn winter"])
    if items is None:
        items = HybridItemTokenizer(num_levels, codebook_size, prefix_len=prefix_len or 1).fit(
            hashed_text_features(ds.item_texts), seed=seed)
    elif prefix_len is not None and items.prefix_len != prefix_len:
        items = items.variant(prefix_len)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048,
                      tie_word_embeddings=True, rms_norm_eps=1e-5,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=None, **sizes)
    backbone = LlamaForCausalLM(cfg)
    config.setdefault("max_history", ds.max_history)
    return SigmaModel(backbone, tok, items, SigmaConfig(mode=mode, backbone="synthetic",
                                                        **config)).eval()
