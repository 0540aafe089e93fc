"""``SIDConstrainedLogitsProcessor``: trie-constrained semantic-ID generation inside
transformers' own ``model.generate(num_beams=...)``, a vectorized drop-in for
``prefix_allowed_tokens_fn``; and ``check_generation_config``, which lists generation settings
that would change or prune the constrained scores.
"""

from __future__ import annotations

import math
import warnings

import torch

from ._checks import check_int, check_mask
from .sid_vocab import as_vocab
from .trie import PrefixTrie

try:  # the processor subclasses transformers' base class when transformers is installed
    from transformers import LogitsProcessor as _LogitsProcessorBase
except ImportError:  # pragma: no cover - exercised only without transformers
    _LogitsProcessorBase = object

__all__ = ["SIDConstrainedLogitsProcessor", "check_generation_config"]


_PRUNING_SETTINGS = ("top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                     "top_h")
_SCORE_CHANGING = ("repetition_penalty", "no_repeat_ngram_size", "encoder_repetition_penalty",
                   "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                   "sequence_bias", "forced_eos_token_id", "forced_bos_token_id")


def check_generation_config(generation_config, *, warn: bool = True) -> list[str]:
    """Settings of a ``GenerationConfig`` that would change or prune the constrained scores.

    In ``model.generate`` the sampling warpers (``top_k``, ``top_p``, ``min_p``, ...) run after
    every logits processor, and only when ``do_sample=True``: they can then drop valid SID
    tokens (a trie-valid token outside the LM's top-k is silently never generated). Other
    processors (``repetition_penalty``, ``no_repeat_ngram_size``, ``suppress_tokens``, ...)
    change scores whatever ``do_sample`` is: SID codes legitimately repeat across levels.
    Returns one line per problem (and warns when ``warn``). Pass ``do_sample=False,
    top_k=None, top_p=None`` to ``generate`` explicitly.
    """
    problems = []
    get = lambda name: getattr(generation_config, name, None)  # noqa: E731
    if get("do_sample"):
        problems.append("do_sample=True: sampling instead of exact beam search")
        for name in _PRUNING_SETTINGS:
            value = get(name)
            if value is None:
                continue
            prunes = {"top_k": value not in (0,), "top_p": value < 1.0,
                      "typical_p": value < 1.0}.get(name, value > 0)
            if prunes:
                problems.append(f"{name}={value} with do_sample=True prunes tokens after the SID "
                                f"constraint (valid SID tokens can be dropped)")
        temp = get("temperature")
        if temp is not None and temp != 1.0:
            problems.append(f"temperature={temp} rescales the scores")
    for name in _SCORE_CHANGING:
        value = get(name)
        if value is None or (name.endswith("repetition_penalty") and value == 1.0) or (
                name == "no_repeat_ngram_size" and value == 0):
            continue
        problems.append(f"{name}={value!r} changes the constrained scores")
    if warn and problems:
        warnings.warn("generation config may change trie-constrained results: "
                      + "; ".join(problems) + " (pass do_sample=False, top_k=None, top_p=None)",
                      stacklevel=2)
    return problems


class SIDConstrainedLogitsProcessor(_LogitsProcessorBase):
    """A ``transformers`` LogitsProcessor that restricts generation to the SIDs of a trie.

    ``SIDConstrainedLogitsProcessor(trie, token_offsets, prompt_length, *, allowed=None,
    eos_token_id=None, num_beams=None)``

    Drop-in replacement for ``prefix_allowed_tokens_fn``::

        proc = SIDConstrainedLogitsProcessor(trie, offsets, input_ids.shape[1], num_beams=W)
        out = model.generate(input_ids, attention_mask=mask, num_beams=W, do_sample=False,
                             top_k=None, top_p=None, max_new_tokens=trie.num_levels,
                             logits_processor=[proc])

    Args:
        trie: the catalog's ``PrefixTrie``.
        token_offsets: vocabulary id of code 0 at each level (sequence of L ints or SIDVocab).
        prompt_length: columns of the (left-padded) prompt, ``input_ids.shape[1]``: the tokens
            after it are the generated SID tokens.
        allowed: None, or a bool item mask [N] (shared) or [B, N] (request b owns rows
            b*R .. b*R + R - 1 of generate's flattened beams, R = rows // B).
        eos_token_id: the token(s) allowed once all L levels are generated (see below).
        num_beams: rows per request (``max(num_beams, num_return_sequences)``), used only for
            transformers' rule below; default B from ``allowed``, else every row on its own.

    At each step it walks every row's generated tokens through the trie (one vectorized
    ``trie.walk`` for all rows) and leaves only the tokens of the reached node's children
    finite (with ``allowed``: only children with an allowed item below them); every other
    token becomes -inf. The result is identical to transformers'
    ``PrefixConstrainedLogitsProcessor`` given a ``prefix_allowed_tokens_fn`` that returns the
    same token lists, including its rule that a request whose allowed tokens all score -inf on
    every row gets score 0 on them.

    After the last level (L generated tokens) only ``eos_token_id`` is allowed; without one,
    asking for an (L+1)-th token raises ValueError: set ``max_new_tokens=L`` (recommended) or
    pass ``eos_token_id`` (and ``max_new_tokens >= L + 1``). A row whose tokens left the trie
    (possible only when a request has fewer valid continuations than beams, where beam search
    keeps -inf beams) gets every token -inf; its score is -inf already.

    Generation config: sampling warpers (``top_k``, ``top_p``, ``min_p``, ...) run after every
    logits processor but only with ``do_sample=True``, where they can silently drop valid SID
    tokens; ``repetition_penalty``, ``no_repeat_ngram_size`` and ``suppress_tokens`` change
    scores (SID codes repeat across levels). Pass ``do_sample=False, top_k=None, top_p=None``;
    ``check_generation_config(model.generation_config)`` lists (and warns about) settings
    that would interfere.
    """

    def __init__(self, trie: PrefixTrie, token_offsets, prompt_length: int, *, allowed=None,
                 eos_token_id=None, num_beams: int | None = None):
        if not isinstance(trie, PrefixTrie):
            raise TypeError(f"trie must be a sigma_fast.PrefixTrie; got {type(trie).__name__}")
        self.trie = trie
        self.vocab = as_vocab(token_offsets, trie)
        self.prompt_length = check_int(prompt_length, "prompt_length", 0)
        self.num_beams = None if num_beams is None else check_int(num_beams, "num_beams", 1)
        self._allowed_nodes = None
        if allowed is not None:
            m, _ = check_mask(allowed, "allowed", trie.item_id_bound, "trie.item_id_bound")
            self._allowed_nodes = trie.allowed_nodes(m.cpu())
        if eos_token_id is None:
            self.eos_token_id = None
        else:
            ids = (list(eos_token_id) if isinstance(eos_token_id, (list, tuple))
                   else [eos_token_id])
            self.eos_token_id = [check_int(i, "eos_token_id", 0) for i in ids]
        self._cache: dict = {}

    def _on(self, device):
        """The trie arrays (and level offsets) on ``device``, cached."""
        key = str(device)
        if key not in self._cache:
            t = self.trie.to(device)
            nodes = None if self._allowed_nodes is None else self._allowed_nodes.to(device)
            offsets = torch.tensor(self.vocab.token_offsets, dtype=torch.int64, device=device)
            self._cache[key] = (t, nodes, offsets)
        return self._cache[key]

    def allowed_token_mask(self, input_ids: torch.LongTensor, vocab_size: int) -> torch.Tensor:
        """bool [rows, vocab_size]: the tokens each row may generate next."""
        rows, cur_len = input_ids.shape
        step = cur_len - self.prompt_length
        device = input_ids.device
        if step < 0:
            raise ValueError(f"input_ids have {cur_len} columns, fewer than prompt_length "
                             f"{self.prompt_length}")
        out = torch.zeros((rows, vocab_size), dtype=torch.bool, device=device)
        levels = self.trie.num_levels
        if step >= levels:
            if self.eos_token_id is None:
                raise ValueError(f"generation asked for token {step + 1} after the prompt but "
                                 f"SIDs have {levels} levels; pass max_new_tokens={levels} or "
                                 f"eos_token_id")
            out[:, self.eos_token_id] = True
            return out
        if self.vocab.vocab_end > vocab_size:
            raise ValueError(f"token_offsets place codes up to token id "
                             f"{self.vocab.vocab_end - 1}, beyond the scores' vocabulary of "
                             f"{vocab_size}")
        trie, allowed_nodes, offsets = self._on(device)
        if step:
            node = trie.walk(self.vocab.codes(input_ids[:, self.prompt_length:]))  # -1: off-trie
        else:
            node = torch.zeros(rows, dtype=torch.int64, device=device)
        live = node >= 0
        node = node.clamp(min=0)
        first, last = trie.child_offsets[node], trie.child_offsets[node + 1]
        counts = torch.where(live, last - first, torch.zeros_like(first))
        row = torch.repeat_interleave(torch.arange(rows, device=device), counts)
        # CSR slots of every (row, child): first[row] + rank within the row
        start = torch.cumsum(counts, 0) - counts
        slot = first[row] + (torch.arange(row.numel(), device=device) - start[row])
        if allowed_nodes is not None:
            child = trie.child_nodes[slot]
            if allowed_nodes.dim() == 1:
                keep = allowed_nodes[child]
            else:
                per_request = rows // allowed_nodes.shape[0]
                if per_request * allowed_nodes.shape[0] != rows:
                    raise ValueError(f"{rows} rows cannot be split over {allowed_nodes.shape[0]} "
                                     f"requests of the allowed mask")
                keep = allowed_nodes[row // per_request, child]
            row, slot = row[keep], slot[keep]
        out[row, trie.child_tokens[slot] + offsets[step]] = True
        return out

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = self.allowed_token_mask(input_ids, scores.shape[-1])
        processed = scores.masked_fill(~allowed, -math.inf)
        # transformers' PrefixConstrainedLogitsProcessor: when every allowed token of every row
        # of a request scores -inf, the request's allowed tokens get score 0 instead.
        rows = scores.shape[0]
        per_request = self._rows_per_request(rows)
        dead = processed.amax(dim=-1).isneginf().view(-1, per_request).all(dim=-1, keepdim=True)
        if bool(dead.any()):
            zero = torch.zeros_like(scores).masked_fill(~allowed, -math.inf)
            processed = torch.where(dead.repeat_interleave(per_request, dim=0), zero, processed)
        return processed

    def _rows_per_request(self, rows: int) -> int:
        if self.num_beams is not None:
            return self.num_beams
        if self._allowed_nodes is not None and self._allowed_nodes.dim() == 2:
            return max(rows // self._allowed_nodes.shape[0], 1)
        return 1  # unknown: the -inf rule then applies row by row
