"""Trie-constrained semantic-ID generation with Hugging Face causal LMs.

``constrained_beam_search(model, input_ids, attention_mask, trie, ...)``, backed by
``PrefixTrie`` and the ``constrained_beam_step`` op, is our own batched beam search. The prompt
is prefilled once per request (not once per beam), the KV cache is expanded to the beams only
after the first level, and each later level is one forward pass of one token per beam followed
by a cache reorder by parent. ``num_levels < L`` searches prefixes only (step 1 of SIGMA's
three-step generation).
(``SIDConstrainedLogitsProcessor`` in ``logits_processor.py`` constrains transformers' own
``generate`` instead.)

Semantic-ID tokens live in the LM's vocabulary at per-level offsets: code ``c`` of level ``l``
is vocabulary id ``token_offsets[l] + c`` (``SIDVocab``). Levels may share one range (equal
offsets) or use disjoint ranges.

``import sigma_fast`` does not import transformers; version differences go through
``sigma_fast._hf``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _hf
from ._checks import check_dtype, check_int, check_mask, check_rank
from .beam_step import constrained_beam_step
from .sid_vocab import as_vocab
from .trie import PrefixTrie

__all__ = ["NORMALIZE", "SearchResult", "constrained_beam_search"]

NORMALIZE = ("full", "vocab", "valid", "none")


def _vocab_size(model) -> int | None:
    try:
        emb = model.get_output_embeddings()
    except Exception:  # noqa: BLE001 - models without the accessor
        emb = None
    weight = getattr(emb, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


@dataclass
class SearchResult:
    """Output of ``constrained_beam_search``; beams sorted best first within each request.

    Attributes:
        codes: int64 [B, W, l], the codes of each beam (l = num_levels); -1 in padding beams.
        scores: float32 [B, W], summed log-probabilities of the beam's tokens (see
            ``normalize``); -inf for padding beams.
        states: int64 [B, W], the trie node of each beam (a leaf at full depth); -1 padding.
        item_begin, item_end: int64 [B, W], the items below each beam are
            ``trie.item_perm[item_begin:item_end]`` (sorted code order; the prefix bucket of a
            prefix-only search); 0, 0 for padding beams. With an ``allowed`` mask these ranges
            can include items the mask excludes (use ``beam_items``).
        item_ids: int64 [B, W] at full depth: the first item (trie order, i.e. the earliest
            catalog row among rows with that code) under the beam's leaf that the request
            allows; -1 for padding. Several items can share a full code; all of them are
            returned by ``beam_items(b, w)``. None for a prefix-only search.
        past_key_values, attention_mask, position_ids, next_token_ids: only with
            ``return_cache=True`` (or "beams"): the model's cache for the B*W beams (row
            b*W + w) holding the prompt and the first l - 1 chosen tokens, the matching
            attention mask [B*W, T + l - 1], the position id the next fed token must use
            [B*W], and the vocabulary id of each beam's last code [B*W] (not yet fed). Feeding
            ``next_token_ids`` (then e.g. a query token) continues every beam.
            With ``return_cache="prompt"``: the cache of the B prompts alone (nothing of the
            beams), their attention mask [B, T] and the position id of the first token after
            each prompt [B]; ``next_token_ids`` is None. Continuing all W beams of a request
            from it takes one sequence of W blocks with a block-diagonal attention mask (what
            three-step generation does), so the prompt's cache is never copied per beam.
        num_forward_calls: model forward passes made (1 prefill + l - 1 steps).
    """

    codes: torch.Tensor
    scores: torch.Tensor
    states: torch.Tensor
    item_begin: torch.Tensor
    item_end: torch.Tensor
    item_ids: torch.Tensor | None
    num_forward_calls: int = 0
    past_key_values: Any = None
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    next_token_ids: torch.Tensor | None = None
    _trie: PrefixTrie | None = field(default=None, repr=False)
    _item_mask: torch.Tensor | None = field(default=None, repr=False)

    def beam_items(self, b: int, w: int) -> torch.Tensor:
        """All allowed item ids under beam (b, w), in trie order (empty for a padding beam)."""
        if self._trie is None:
            raise ValueError("this SearchResult has no trie attached")
        begin, end = int(self.item_begin[b, w]), int(self.item_end[b, w])
        ids = self._trie.item_perm[begin:end]
        if self._item_mask is not None:
            mask = self._item_mask if self._item_mask.dim() == 1 else self._item_mask[b]
            ids = ids[mask.to(ids.device)[ids]]
        return ids


def _check_prompt(input_ids, attention_mask):
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor; got {type(input_ids).__name__}")
    check_dtype(input_ids, "input_ids", (torch.int64, torch.int32))
    check_rank(input_ids, "input_ids", 2, "[B, T]")
    b, t = input_ids.shape
    if b == 0 or t == 0:
        raise ValueError(f"input_ids must be non-empty [B, T]; got shape {list(input_ids.shape)}")
    if attention_mask is None:
        return input_ids.long(), torch.ones_like(input_ids, dtype=torch.long)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor; got "
                        f"{type(attention_mask).__name__}")
    if list(attention_mask.shape) != [b, t]:
        raise ValueError(f"attention_mask must have input_ids' shape {[b, t]}; got "
                         f"{list(attention_mask.shape)}")
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask must be on input_ids' device ({input_ids.device}); got "
                         f"{attention_mask.device}")
    mask = attention_mask.long()
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1")
    # Left padding: within a row the mask never goes from 1 back to 0, and the last column is 1.
    bad_rows = (mask[:, -1] == 0) | (torch.diff(mask, dim=1) < 0).any(1)
    if bool(bad_rows.any()):
        bad = int(bad_rows.nonzero()[0])
        raise ValueError(f"attention_mask must be left-padded (zeros only before the prompt, last "
                         f"column all ones; tokenizer.padding_side = 'left'); row {bad} is not")
    return input_ids.long(), mask


def _first_allowed_item(trie: PrefixTrie, states, begin, end, item_mask):
    """First allowed item id under each node (trie order); -1 for padding (states -1)."""
    live = states >= 0
    if item_mask is None:
        first = trie.item_perm[begin.clamp(max=trie.num_items - 1)]
    else:
        span = int((end - begin).max()) if begin.numel() else 0
        pos = begin[..., None] + torch.arange(max(span, 1), device=begin.device)
        inside = pos < end[..., None]
        ids = trie.item_perm[pos.clamp(max=trie.num_items - 1)]
        mask = item_mask.to(ids.device)
        if mask.dim() == 1:
            ok = mask[ids]
        else:
            ok = torch.gather(mask, 1, ids.reshape(ids.shape[0], -1)).reshape(ids.shape)
        ok &= inside
        first = torch.gather(ids, -1, ok.to(torch.uint8).argmax(-1, keepdim=True))[..., 0]
        live &= ok.any(-1)
    return torch.where(live, first, torch.full_like(first, -1))


@contextlib.contextmanager
def _code_rows_head(model, lo: int, hi: int, enabled: bool):
    """Within the block the model's LM head computes only vocabulary rows [lo, hi) (a view of
    its weight, no copy); yields lo, or 0 when the head was left alone. A small model's head
    is a large share of the weights every single-token step must stream (SmolLM2-135M: 28M of
    135M parameters), and only the code rows are needed unless normalize="vocab"."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if enabled and callable(get) else None
    # Only a plain Linear is narrowed (not a quantized / adapter-wrapped head).
    if type(head) is not torch.nn.Linear or not callable(getattr(model, "set_output_embeddings",
                                                                 None)):
        yield 0
        return
    narrow = torch.nn.Linear(head.in_features, hi - lo, bias=head.bias is not None,
                             device="meta")
    narrow.weight = torch.nn.Parameter(head.weight[lo:hi], requires_grad=False)
    if head.bias is not None:
        narrow.bias = torch.nn.Parameter(head.bias[lo:hi], requires_grad=False)
    model.set_output_embeddings(narrow)
    try:
        if model.get_output_embeddings() is not narrow:  # the model ignores the setter
            yield 0
        else:
            yield lo
    finally:
        model.set_output_embeddings(head)


def constrained_beam_search(model, input_ids, attention_mask=None, trie: PrefixTrie | None = None,
                            *, token_offsets, beam_width: int, num_levels: int | None = None,
                            allowed=None, normalize: str = "full", on_empty: str = "error",
                            backend: str | None = None, return_cache: bool = False,
                            narrow_head: bool = False, inputs_embeds=None) -> SearchResult:
    """Beam search over the semantic IDs in ``trie`` with a Hugging Face causal LM.

    Args:
        model: any HF causal LM (``AutoModelForCausalLM``) whose cache supports
            ``reorder_cache`` (DynamicCache, the default). Run under ``torch.no_grad``.
        input_ids: int64 [B, T], B prompts, **left-padded** to a common length T.
        attention_mask: [B, T] 0/1 (None = no padding).
        trie: the catalog's ``PrefixTrie`` (moved to the model's device as needed).
        token_offsets: vocabulary id of code 0 at each level (a sequence of L ints or a
            ``SIDVocab``): code c of level l is token ``token_offsets[l] + c``.
        beam_width: W, beams kept per request at every level (and returned).
        num_levels: levels to generate, 1 .. L (default L). Fewer than L gives a prefix-only
            search: the best prefixes with their beam scores and buckets (three-step
            generation).
        allowed: None, or a bool item mask (indexed by the trie's item ids) shared by every
            request ``[N]`` or per request ``[B, N]``. Only prefixes with at least one allowed
            item below them are generated (``trie.allowed_nodes``; no trie rebuild).
        normalize: a token's log-probability is its logit's log-softmax over "full": the
            level's K code tokens (default; the LM's mass outside the code range is ignored),
            "vocab": the whole vocabulary (what ``model.generate`` scores; equal to "full" for
            a model that only puts mass on code tokens), "valid": the beam's valid children,
            or "none": raw logits.
        on_empty: a request with no valid continuation raises ValueError naming it ("error")
            or gets padding beams ("pad").
        backend: the constrained step's backend (None = fastest for the device).
        return_cache: False; True or "beams": also return the KV cache and positions to
            continue every beam, the prompt's cache copied to each beam; "prompt": return the
            prompts' own cache instead (see ``SearchResult``).
        narrow_head: unless normalize="vocab", the model's LM head (a plain ``nn.Linear``)
            is swapped during the call for a view of its code rows only, so each step streams
            ~L*K rows of the head instead of the whole vocabulary (about 20% of a
            SmolLM2-135M step); it is restored on exit, even on error. Off by default because it
            changes the model object for the duration of the call: enable it only when no other
            thread uses the same model.
        inputs_embeds: optional float [B, T, hidden] read by the prefill instead of embedding
            ``input_ids`` (which still give the shape; e.g. SIGMA's prompts, whose item
            placeholders carry item embeddings). Later steps feed code tokens by id.

    Returns a ``SearchResult``: codes [B, W, l], scores [B, W], states [B, W], item ranges, and
    at full depth ``item_ids`` [B, W]. Requests with fewer than W valid SIDs get padding beams
    (codes -1, score -inf, item -1).

    The model runs 1 + (l - 1) forward passes in all, whatever B and W: one prefill of the B
    prompts (only the last position's logits are computed when the model accepts
    ``logits_to_keep``), then one token per beam per level. Position ids continue from each
    prompt's true length (``cumsum(attention_mask) - 1``, as ``generate`` does), so a prompt's
    results do not depend on how much padding its batch needs. Padding beams are fed a
    harmless code token and never produce candidates. Ties between beams follow the step op:
    higher score, then smaller parent beam, then smaller code.
    """
    if not isinstance(trie, PrefixTrie):
        raise TypeError(f"trie must be a sigma_fast.PrefixTrie; got {type(trie).__name__}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}; got {normalize!r}")
    vocab = as_vocab(token_offsets, trie)
    beam_width = check_int(beam_width, "beam_width", 1)
    levels = trie.num_levels if num_levels is None else check_int(num_levels, "num_levels", 1)
    if levels > trie.num_levels:
        raise ValueError(f"num_levels must be <= {trie.num_levels} (the trie's levels); got "
                         f"{levels}")
    input_ids, mask = _check_prompt(input_ids, attention_mask)
    batch, _ = input_ids.shape
    if inputs_embeds is not None:
        if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 \
                or list(inputs_embeds.shape[:2]) != list(input_ids.shape):
            raise ValueError(f"inputs_embeds must be a tensor [B, T, hidden] with input_ids' "
                             f"shape {list(input_ids.shape)} in front; got "
                             f"{getattr(inputs_embeds, 'shape', type(inputs_embeds).__name__)}")
        if inputs_embeds.device != input_ids.device:
            raise ValueError(f"inputs_embeds must be on input_ids' device ({input_ids.device}); "
                             f"got {inputs_embeds.device}")
    vocab_size = _vocab_size(model)
    if vocab_size is not None and vocab.vocab_end > vocab_size:
        raise ValueError(f"token_offsets place codes up to token id {vocab.vocab_end - 1}, beyond "
                         f"the model's vocabulary of {vocab_size}")
    device = input_ids.device
    trie_d = trie.to(device)
    item_mask = None
    if allowed is not None:
        item_mask = check_mask(allowed, "allowed", trie.item_id_bound, "trie.item_id_bound",
                               batch=batch)[0]
    allowed_nodes = None
    if item_mask is not None:
        on_trie = item_mask.device.type == "cpu" or item_mask.device == device
        allowed_nodes = trie_d.allowed_nodes(item_mask if on_trie else item_mask.cpu())
    step_norm = "none" if normalize == "vocab" else normalize
    if return_cache not in (False, True, "beams", "prompt"):
        raise ValueError(f"return_cache must be False, True, 'beams' or 'prompt'; got "
                         f"{return_cache!r}")
    per_beam = return_cache in (True, "beams")

    accepts = _hf.forward_params(model)
    pos_kw = "position_ids" in accepts or "kwargs" in accepts
    cache_kw = _hf.cache_kwarg(model)
    lengths = mask.sum(1)  # true prompt lengths
    prefill = dict(attention_mask=mask, use_cache=True)
    if inputs_embeds is None:
        prefill["input_ids"] = input_ids
    else:
        prefill["inputs_embeds"] = inputs_embeds
    if pos_kw:
        prefill["position_ids"] = _hf.position_ids(mask)
    if "logits_to_keep" in accepts:
        prefill["logits_to_keep"] = 1

    rows = torch.arange(batch, device=device)
    calls = 0
    lo = min(vocab.token_offsets[:levels])
    hi = max(vocab.token_offsets[:levels]) + vocab.codebook_size
    narrow = narrow_head and normalize != "vocab"
    with torch.no_grad(), _code_rows_head(model, lo, hi, narrow):
        out = model(**prefill)
        calls += 1
        cache = _hf.output_cache(out)
        if cache is None or not hasattr(cache, "reorder_cache"):
            raise TypeError(f"{type(model).__name__} returned no reorderable cache "
                            f"(past_key_values={type(cache).__name__}); constrained_beam_search "
                            f"needs a cache with reorder_cache (e.g. DynamicCache)")
        logits = out.logits[:, -1:, :]  # [B, 1, V], or [B, 1, hi - lo] with a narrowed head
        del out
        base = lo if narrow and logits.shape[-1] == hi - lo else 0  # vocab id of column 0
        if base + logits.shape[-1] < hi:
            raise ValueError(f"token_offsets place codes up to token id {hi - 1}, beyond the "
                             f"model's {logits.shape[-1]} logits")
        scores = torch.zeros((batch, 1), dtype=torch.float32, device=device)
        states = torch.zeros((batch, 1), dtype=torch.int64, device=device)
        codes = torch.empty((batch, 1, 0), dtype=torch.int64, device=device)
        mask_bw = pos_bw = None
        for level in range(levels):
            if level > 0:
                # Feed each beam's last code (padding beams: code 0, harmless) at the next
                # position of its own prompt.
                last = codes[:, :, -1].clamp(min=0) + vocab.token_offsets[level - 1]
                mask_bw = torch.cat([mask_bw, mask_bw.new_ones((mask_bw.shape[0], 1))], dim=1)
                kw = {"input_ids": last.reshape(-1, 1), "attention_mask": mask_bw,
                      cache_kw: cache, "use_cache": True}
                if pos_kw:
                    kw["position_ids"] = (pos_bw + (level - 1)).unsqueeze(1)
                out = model(**kw)
                calls += 1
                cache = _hf.output_cache(out)
                logits = out.logits[:, -1, :].reshape(batch, beam_width, -1)
                del out
            off = vocab.token_offsets[level] - base
            level_logits = logits[..., off:off + vocab.codebook_size]
            if normalize == "vocab":
                level_logits = (level_logits.float()
                                - torch.logsumexp(logits.float(), dim=-1, keepdim=True))
            step = constrained_beam_step(level_logits, scores, states, trie_d,
                                         beam_width=beam_width, allowed=allowed_nodes,
                                         normalize=step_norm, on_empty=on_empty, backend=backend)
            w_in = scores.shape[1]
            parent = step.parent.clamp(min=0)
            codes = torch.cat([torch.gather(codes, 1, parent[..., None].expand(-1, -1, level)),
                               step.token[..., None]], dim=2)
            codes = codes.masked_fill((step.parent < 0)[..., None], -1)
            scores, states = step.scores, step.states
            if level < levels - 1 or per_beam:
                # Level 0 expands the B prefilled rows to B*W beams; later levels reorder.
                flat = (rows[:, None] * w_in + parent).reshape(-1)
                cache.reorder_cache(flat)
                if level == 0:
                    mask_bw = mask.index_select(0, flat)
                    pos_bw = lengths.index_select(0, flat)
                # Rows of one request share their mask, so later levels need no mask reorder.

    live = states >= 0
    node = states.clamp(min=0)
    begin = torch.where(live, trie_d.item_begin[node], torch.zeros_like(node))
    end = torch.where(live, trie_d.item_end[node], torch.zeros_like(node))
    item_ids = None
    if levels == trie.num_levels:
        item_ids = _first_allowed_item(trie_d, states, begin, end, item_mask)
    result = SearchResult(codes=codes, scores=scores, states=states, item_begin=begin,
                          item_end=end, item_ids=item_ids, num_forward_calls=calls,
                          _trie=trie_d, _item_mask=item_mask)
    if return_cache == "prompt":
        if levels > 1:  # drop the beams' tokens, keep one row per request
            cache.crop(-(levels - 1))
            cache.batch_select_indices(rows * beam_width)
        result.past_key_values = cache
        result.attention_mask = mask
        result.position_ids = lengths
    elif per_beam:
        result.past_key_values = cache
        result.attention_mask = mask_bw
        result.position_ids = pos_bw + (levels - 1)
        result.next_token_ids = (codes[:, :, -1].clamp(min=0)
                                 + vocab.token_offsets[levels - 1]).reshape(-1)
    return result
