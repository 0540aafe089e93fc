"""Three-step item generation (DESIGN.md §1.4) and the generation of the baseline variants.

SIGMA (mode "sigma"), per batch of requests:

1. the prompt is prefilled once; a trie-constrained beam search over the SID prefixes keeps the
   K best prefixes of each request (only prefixes with an item the request allows), with their
   beam log-probabilities φ (``constrained_beam_search(..., return_cache="prompt")``);
2. one forward over the K rows ``<prefix_k><q>`` per request on the prompt's KV cache gives the
   ``<q>`` states h_k, projected into the item space: the K rows are packed into one sequence
   of K blocks whose attention mask lets each block see the prompt and itself only, so the
   prompt is neither re-read nor its cache copied per beam (attention implementations that
   cannot take such a mask, e.g. flash attention, continue a per-beam copy of the cache);
3. ``apf_fuse``: the top M items of each prefix bucket by cosine similarity, fused across the K
   prefixes by adaptive probabilistic fusion (``adaptive=False``: fixed temperature, the "without
   APF" ablation), restricted to the request's allowed items → the top N unique items.

GR(ID) (mode "gr_id"): one forward of ``prompt <q>``, cosine similarity with every allowed item.
GR(SID) (mode "gr_sid"): trie beam search over the full deduplicated SIDs; the beams are the
ranking.

>>> rec = Recommender(model, num_beams=10, top_m=50)
>>> out = rec(samples, top_n=20)          # out.item_ids int64 [B, 20], out.scores [B, 20]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import _hf, _threads
from ..apf import apf_fuse
from ..item_index import ItemIndex
from ..search import constrained_beam_search
from ..trie import PrefixTrie

__all__ = ["Recommendations", "Recommender", "recommend", "allowed_masks"]


@dataclass
class Recommendations:
    """Ranked items per request, best first; padding -1 / -inf.

    item_ids int64 [B, N]; scores float32 [B, N] (log P for SIGMA, cosine for GR(ID), beam
    log-probability for GR(SID)); prefixes int64 [B, K, ℓ] and prefix_scores float32 [B, K]
    from step 1 and queries float32 [B, K, H] (unit ``<q>`` embeddings of each prefix, step 2)
    (SIGMA only).
    """

    item_ids: torch.Tensor
    scores: torch.Tensor
    prefixes: torch.Tensor | None = None
    prefix_scores: torch.Tensor | None = None
    queries: torch.Tensor | None = None


def allowed_masks(samples, num_items: int) -> torch.Tensor | None:
    """bool [B, N] from the samples' ``allowed`` item lists (None when no sample has one)."""
    if all(getattr(s, "allowed", None) is None for s in samples):
        return None
    mask = torch.zeros((len(samples), num_items), dtype=torch.bool)
    for r, s in enumerate(samples):
        a = getattr(s, "allowed", None)
        if a is None:
            mask[r] = True
        else:
            a = np.asarray(a, dtype=np.int64)
            if a.size and (a.min() < 0 or a.max() >= num_items):
                raise IndexError(f"request {r}: allowed items must be in [0, {num_items}); got "
                                 f"values in [{a.min()}, {a.max()}]")
            mask[r, torch.from_numpy(a)] = True
    return mask


class Recommender:
    """Generation with a fixed (trained) ``SigmaModel``: item embeddings, the prefix trie and the
    item index are computed once.

    Args:
        model: a ``SigmaModel`` (put in eval mode).
        num_beams: K, prefixes kept by step 1 (and beams of GR(SID), at least ``top_n``).
        top_m: M, items kept per prefix bucket in step 3.
        tau: APF temperature (default: the model's InfoNCE temperature).
        adaptive: APF's adaptive temperature (False = the "without APF" ablation).
        sigma_min: floor of the beam-score spread in APF.
        batch_size: requests per forward pass.
    """

    def __init__(self, model, *, num_beams: int = 10, top_m: int = 50, tau: float | None = None,
                 adaptive: bool = True, sigma_min: float = 1e-3, batch_size: int = 16,
                 backend: str | None = None):
        if num_beams < 1 or top_m < 1 or batch_size < 1:
            raise ValueError(f"num_beams, top_m and batch_size must be >= 1; got {num_beams}, "
                             f"{top_m}, {batch_size}")
        self.model = model.eval()
        self.mode = model.config.mode
        self.num_beams, self.top_m = int(num_beams), int(top_m)
        self.tau = float(tau if tau is not None else model.config.tau)
        self.adaptive, self.sigma_min = bool(adaptive), float(sigma_min)
        self.batch_size = int(batch_size)
        self.backend = backend
        dev = model.device
        codes = model.codes
        self.vocab = model.vocab
        self.trie = PrefixTrie(codes.numpy(), codebook_size=self.vocab.codebook_size)
        with torch.no_grad():
            v = torch.nn.functional.normalize(model.item_embeddings().float(), dim=-1)
        self.item_vectors = v.to(dev)  # [N, H], unit rows
        self.index = None
        if self.mode == "sigma":
            self.index = ItemIndex(v.cpu().contiguous(), codes.numpy())
            if dev.type != "cpu":
                self.index = self.index.to(dev)
        self._cache_kw = _hf.cache_kwarg(model.backbone.base_model)
        # Step 2 on the shared prompt cache needs a custom 4-D (additive) attention mask.
        attn = getattr(model.backbone.config, "_attn_implementation", None) or "eager"
        self._shared_step2 = attn in ("eager", "sdpa")

    # ----------------------------------------------------------------------------------
    def __call__(self, samples, *, top_n: int = 20, progress: bool | None = None
                 ) -> Recommendations:
        """Recommendations for a list of ``TaskSample``-like requests (prompt with an
        ``{items}`` slot, history, allowed); each request's ``allowed`` items bound its
        results."""
        from tqdm.auto import tqdm

        if top_n < 1:
            raise ValueError(f"top_n must be >= 1; got {top_n}")
        samples = list(samples)
        if not samples:
            raise ValueError("no requests given")
        parts = []
        starts = range(0, len(samples), self.batch_size)
        with torch.no_grad():
            for s in tqdm(starts, desc=f"recommend ({self.mode})", leave=False,
                          disable=(not progress) if progress is not None else True):
                _threads.adapt()
                parts.append(self._batch(samples[s:s + self.batch_size], top_n))
        cat = lambda xs: None if xs[0] is None else torch.cat(xs)  # noqa: E731
        return Recommendations(cat([p.item_ids for p in parts]), cat([p.scores for p in parts]),
                               cat([p.prefixes for p in parts]),
                               cat([p.prefix_scores for p in parts]),
                               cat([p.queries for p in parts]))

    def _prompts(self, samples, append_query: bool):
        model = self.model
        enc = [model.encode(s, with_label=False) for s in samples]
        if append_query:
            for e in enc:
                e.input_ids.append(model.query_token_id)
        batch = model.collate(enc, padding_side="left")
        dev = model.device
        ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        emb = model.input_embeddings(ids, batch["slot_items"].to(dev))
        return ids, mask, emb

    def _batch(self, samples, top_n: int) -> Recommendations:
        model = self.model
        dev = model.device
        allowed = allowed_masks(samples, model.num_items)
        if allowed is not None:
            allowed = allowed.to(dev)
        if self.mode == "gr_id":
            ids, mask, emb = self._prompts(samples, append_query=True)
            pos = _hf.position_ids(mask)
            h = model.backbone.base_model(inputs_embeds=emb, attention_mask=mask,
                                          position_ids=pos).last_hidden_state[:, -1]
            sims = model.query_embeddings(h) @ self.item_vectors.T       # [B, N]
            if allowed is not None:
                sims = sims.masked_fill(~allowed, float("-inf"))
            scores, items = torch.sort(sims, dim=1, descending=True, stable=True)
            scores, items = scores[:, :top_n], items[:, :top_n]
            items = items.masked_fill(torch.isinf(scores), -1)
            if items.shape[1] < top_n:
                pad = top_n - items.shape[1]
                items = torch.nn.functional.pad(items, (0, pad), value=-1)
                scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
            return Recommendations(items.cpu(), scores.float().cpu())

        ids, mask, emb = self._prompts(samples, append_query=False)
        if self.mode == "gr_sid":
            width = max(self.num_beams, top_n)
            res = constrained_beam_search(model.backbone, ids, mask, self.trie,
                                          token_offsets=self.vocab, beam_width=width,
                                          allowed=allowed, on_empty="pad", inputs_embeds=emb,
                                          backend=self.backend)
            return Recommendations(res.item_ids[:, :top_n].cpu(),
                                   res.scores[:, :top_n].float().cpu())

        # SIGMA: step 1, prefix beam search; step 2, <prefix_k><q> for the K beams.
        k = self.num_beams
        res = constrained_beam_search(model.backbone, ids, mask, self.trie,
                                      token_offsets=self.vocab, beam_width=k, allowed=allowed,
                                      on_empty="pad", inputs_embeds=emb,
                                      return_cache="prompt" if self._shared_step2 else "beams",
                                      backend=self.backend)
        b = ids.shape[0]
        if self._shared_step2:
            h = self._query_states_shared(res)
        else:
            h = self._query_states_per_beam(res)
        h = model.query_embeddings(h.reshape(b * k, -1)).float()
        queries = h.reshape(b, k, -1)
        # Step 3: in-bucket retrieval + adaptive probabilistic fusion.
        scores = res.scores.float()
        buckets = self.index.bucket_of(res.codes.cpu()).to(dev)
        dead = buckets < 0
        scores = scores.masked_fill(dead, float("-inf"))
        queries = torch.where(torch.isinf(scores)[..., None],
                              torch.ones_like(queries), queries)  # unused rows: any unit vector
        item_ids, log_p, _ = apf_fuse(scores, buckets.clamp(min=0), queries.contiguous(),
                                      self.index, top_m=self.top_m, top_n=top_n, tau=self.tau,
                                      adaptive=self.adaptive, sigma_min=self.sigma_min,
                                      allowed=allowed, backend=self.backend)
        return Recommendations(item_ids.cpu(), log_p.cpu(), res.codes.cpu(),
                               res.scores.float().cpu(), h.reshape(b, k, -1).cpu())

    def _query_states_shared(self, res) -> torch.Tensor:
        """Hidden states at ``<q>`` [B, K, hidden] for every beam's ``<prefix><q>``: one
        sequence per request of K blocks ``c_1 .. c_l <q>`` on the prompt's cache; a block sees
        the prompt and its own earlier tokens only, and restarts at the position after the
        prompt, so each block's states equal those of the prompt followed by that block."""
        model = self.model
        b, k, levels = res.codes.shape
        m = levels + 1
        n = k * m
        dev = res.codes.device
        tokens = torch.cat([self.vocab.token_ids(res.codes.clamp(min=0)),  # padding: code 0
                            torch.full((b, k, 1), model.query_token_id, device=dev)], 2)
        t = res.attention_mask.shape[1]
        within = torch.arange(n, device=dev) % m
        block = torch.arange(n, device=dev) // m
        own = (block[:, None] == block[None, :]) & (within[:, None] >= within[None, :])
        see = torch.cat([res.attention_mask.bool()[:, None, :].expand(b, n, t),
                         own.expand(b, n, n)], 2)
        dtype = model.backbone.get_input_embeddings().weight.dtype
        mask = torch.zeros(see.shape, dtype=dtype, device=dev)
        mask = mask.masked_fill(~see, torch.finfo(dtype).min)[:, None]  # [B, 1, n, t + n]
        out = model.backbone.base_model(input_ids=tokens.reshape(b, n), attention_mask=mask,
                                        position_ids=res.position_ids[:, None] + within,
                                        use_cache=True,
                                        **{self._cache_kw: res.past_key_values})
        return out.last_hidden_state[:, m - 1::m]

    def _query_states_per_beam(self, res) -> torch.Tensor:
        """The same states from the per-beam cache: feed ``<c_l><q>`` to each of the B*K
        rows."""
        model = self.model
        rows = res.next_token_ids.shape[0]
        step_ids = torch.stack([res.next_token_ids,
                                torch.full_like(res.next_token_ids, model.query_token_id)], 1)
        step_mask = torch.cat([res.attention_mask, res.attention_mask.new_ones((rows, 2))], 1)
        step_pos = torch.stack([res.position_ids, res.position_ids + 1], 1)
        out = model.backbone.base_model(input_ids=step_ids, attention_mask=step_mask,
                                        position_ids=step_pos, use_cache=True,
                                        **{self._cache_kw: res.past_key_values})
        return out.last_hidden_state[:, -1]


def recommend(model, samples, *, top_n: int = 20, progress: bool | None = None,
              **options) -> Recommendations:
    """One-off three-step generation (see :class:`Recommender` for the options)."""
    return Recommender(model, **options)(samples, top_n=top_n, progress=progress)
