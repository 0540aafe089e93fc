"""Where the semantic-ID codes sit in a language model's vocabulary (``SIDVocab``), and how SID
tokens are named: code ``c`` of level ``l`` is the token ``<{letter of l}_{c}>`` (``<a_12>``,
``<b_3>``, ...; :func:`sid_token`). One naming scheme serves the SIGMA tokenizer and the search.
"""

from __future__ import annotations

import string
from typing import Sequence

import numpy as np
import torch

from ._checks import as_tensor, check_dtype, check_int

__all__ = ["SIDVocab", "as_vocab", "level_letter", "sid_token"]


def level_letter(level: int) -> str:
    """Token prefix letter of a SID level: a, b, c, ... (then a1, b1, ... past z)."""
    letters = string.ascii_lowercase
    return letters[level % 26] + (str(level // 26) if level >= 26 else "")


def sid_token(level: int, code: int) -> str:
    """The vocabulary token of code ``code`` at SID level ``level``: ``<a_12>``, ``<b_3>``..."""
    return f"<{level_letter(level)}_{int(code)}>"


class SIDVocab:
    """Where the semantic-ID codes sit in an LM's vocabulary.

    ``SIDVocab(token_offsets, codebook_size)``: code ``c`` of level ``l`` (0-based) is token id
    ``token_offsets[l] + c``, for ``c`` in ``[0, codebook_size)``. Levels may share one range
    (equal offsets, e.g. codes mapped onto existing vocabulary ids) or have their own (new
    tokens named by :func:`sid_token`, added level by level, see ``SIDVocab.add_tokens``).
    """

    def __init__(self, token_offsets: Sequence[int], codebook_size: int):
        if isinstance(token_offsets, SIDVocab):
            token_offsets = token_offsets.token_offsets
        if isinstance(token_offsets, (torch.Tensor, np.ndarray)):
            token_offsets = token_offsets.tolist()
        if isinstance(token_offsets, (int, np.integer)) or not isinstance(token_offsets,
                                                                           (list, tuple)):
            raise TypeError(f"token_offsets must be a sequence of ints, one per level (vocab id of "
                            f"code 0 at each level); got {type(token_offsets).__name__}")
        if len(token_offsets) == 0:
            raise ValueError("token_offsets must have one entry per level; got an empty sequence")
        self.token_offsets = tuple(check_int(o, f"token_offsets[{i}]", 0)
                                   for i, o in enumerate(token_offsets))
        self.codebook_size = check_int(codebook_size, "codebook_size", 1)

    @property
    def num_levels(self) -> int:
        return len(self.token_offsets)

    @property
    def vocab_end(self) -> int:
        """One past the largest token id any level uses (the LM's vocabulary must reach it)."""
        return max(self.token_offsets) + self.codebook_size

    def level_slice(self, level: int) -> slice:
        """The vocabulary slice holding level ``level``'s codes."""
        off = self.token_offsets[level]
        return slice(off, off + self.codebook_size)

    def token_ids(self, codes):
        """Codes [..., l] (levels 0 .. l-1 in the last dimension) -> vocabulary ids (int64)."""
        c, was_numpy = as_tensor(codes, "codes")
        check_dtype(c, "codes", (torch.int32, torch.int64))
        if c.dim() == 0 or c.shape[-1] > self.num_levels:
            raise ValueError(f"codes must be [..., l] with 1 <= l <= {self.num_levels} levels; got "
                             f"shape {list(c.shape)}")
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= self.codebook_size):
            raise IndexError(f"codes must lie in [0, {self.codebook_size}); got values in "
                             f"[{int(c.min())}, {int(c.max())}]")
        off = torch.tensor(self.token_offsets[: c.shape[-1]], dtype=torch.int64, device=c.device)
        out = c.to(torch.int64) + off
        return out.numpy() if was_numpy else out

    def codes(self, token_ids):
        """Vocabulary ids [..., l] -> codes of levels 0 .. l-1, -1 where an id is not a code of
        its level."""
        t, was_numpy = as_tensor(token_ids, "token_ids")
        check_dtype(t, "token_ids", (torch.int32, torch.int64))
        if t.dim() == 0 or t.shape[-1] > self.num_levels:
            raise ValueError(f"token_ids must be [..., l] with 1 <= l <= {self.num_levels}; got "
                             f"shape {list(t.shape)}")
        off = torch.tensor(self.token_offsets[: t.shape[-1]], dtype=torch.int64, device=t.device)
        c = t.to(torch.int64) - off
        out = torch.where((c >= 0) & (c < self.codebook_size), c, torch.full_like(c, -1))
        return out.numpy() if was_numpy else out

    @classmethod
    def add_tokens(cls, tokenizer, num_levels: int, codebook_size: int) -> "SIDVocab":
        """Add the ``num_levels * codebook_size`` SID tokens (level-major, named by
        :func:`sid_token`: ``<a_0>`` .. ``<a_K-1>``, ``<b_0>`` ..) to a Hugging Face tokenizer
        and return their map (idempotent: tokens it already holds keep their ids). They are
        added as special, unnormalised tokens, so they are never split and lower-casing
        tokenizers keep them intact. Resize the model's embeddings afterwards
        (``model.resize_token_embeddings(len(tokenizer))``)."""
        from transformers import AddedToken

        num_levels = check_int(num_levels, "num_levels", 1)
        codebook_size = check_int(codebook_size, "codebook_size", 1)
        names = [sid_token(lv, c) for lv in range(num_levels) for c in range(codebook_size)]
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=True) for t in names],
                             special_tokens=True)
        ids = tokenizer.convert_tokens_to_ids(names)
        offsets = [ids[lv * codebook_size] for lv in range(num_levels)]
        expected = [o + c for o in offsets for c in range(codebook_size)]
        if ids != expected:
            raise ValueError("the tokenizer did not give the new SID tokens consecutive ids per "
                             "level (some already existed?); use distinct token names")
        return cls(offsets, codebook_size)

    def __repr__(self) -> str:
        return (f"SIDVocab(token_offsets={list(self.token_offsets)}, "
                f"codebook_size={self.codebook_size})")


def as_vocab(token_offsets, trie) -> SIDVocab:
    """``token_offsets`` (a sequence of ints or a SIDVocab) as a SIDVocab checked against the
    trie it addresses (same codebook size, a level offset for every trie level)."""
    if isinstance(token_offsets, SIDVocab):
        if token_offsets.codebook_size != trie.codebook_size:
            raise ValueError(f"token_offsets (SIDVocab) has codebook_size "
                             f"{token_offsets.codebook_size}, the trie {trie.codebook_size}")
        vocab = token_offsets
    else:
        vocab = SIDVocab(token_offsets, trie.codebook_size)
    if vocab.num_levels < trie.num_levels:
        raise ValueError(f"token_offsets must have one entry per trie level ({trie.num_levels}); "
                         f"got {vocab.num_levels}")
    return vocab
