"""The serving engine: SIGMA generation with fixed shapes, preallocated key/value buffers, per-user
prefix reuse and (on CUDA) one CUDA graph per shape bucket (DESIGN.md §7).

>>> engine = Engine(model)                         # a trained SigmaModel (or Engine.from_run(dir))
>>> out = engine(samples, top_n=20)                # the Recommendations of Recommender(model)

What happens to a batch of requests (TaskSample-like: prompt, history, allowed):

1. Each prompt is encoded as the model encodes it and cut where the user's part (profile and
   history) ends and the instruction begins. Requests whose user parts are identical (the
   tasks of one user) share one row of the prompt pass, a *pack*: the user part once (extended
   by whatever the instructions share at their start), then each request's own part, every
   token seeing the user part and its own request's earlier tokens only. Each request's prompt
   keys/values are then gathered into its row of the prompt buffer.
2. A run is padded to a (packs, pack length, requests, prompt length) bucket: counts from
   ``batch_buckets``, lengths rounded up to ``length_multiple``. Padding rows and padding
   tokens are masked and never reach a result.
3. The mode's program runs on the bucket's shapes: SIGMA's trie-constrained prefix beam search
   (beams read their request's prompt keys in place and keep their own few tokens in a small
   beam buffer), the step-2 forward of the K blocks ``<prefix><q>``, the ``<q>`` projection and
   ``apf_fuse``; GR(ID) ranks every allowed item by cosine similarity; GR(SID) searches full
   semantic IDs with ``max(num_beams, top_n)`` beams. On CUDA the program of a bucket is
   captured once in a CUDA graph and replayed; nothing in it synchronises with the host.

Results equal those of :class:`sigma_fast.rec.generate.Recommender` with the same options (item
ids exactly where scores are not tied within float rounding; scores to float rounding). The
engine owns its model: it moves it to the engine's device and dtype (bfloat16 on CUDA by
default, float32 on CPU) and puts it in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import _threads
from ..apf import apf_fuse
from ..beam_step import constrained_beam_step
from ..item_index import ItemIndex
from ..rec.generate import Recommendations, allowed_masks
from ..trie import PrefixTrie
from .lm import DecoderRunner, KeySet, attend

__all__ = ["Engine", "EngineStats"]

_DENSE_BUCKET_TABLE = 1 << 22  # prefix spaces up to this size get a device lookup table


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


@dataclass(frozen=True)
class _Bucket:
    packs: int        # rows of the prompt pass (a user part and some of its requests' own parts)
    pack_len: int     # their padded length
    requests: int     # requests (rows of the beams' prompt buffer)
    prompt_len: int   # padded length of a request's prompt (user part + own part)
    masked: bool      # some request has an allowed subset


@dataclass
class _Prompt:
    shared: tuple   # (token ids, slot items) of the user's part
    own: tuple      # (token ids, slot items) of the request's part
    allowed: np.ndarray | None


@dataclass
class EngineStats:
    """Counters since construction: batches run, requests served, graphs captured, and how
    many requests reused another request's user part."""

    batches: int = 0
    requests: int = 0
    padded_requests: int = 0
    shared_requests: int = 0
    graphs: int = 0
    buckets: dict | None = None

    def as_dict(self) -> dict:
        return {"batches": self.batches, "requests": self.requests,
                "padded_requests": self.padded_requests,
                "shared_requests": self.shared_requests, "graphs": self.graphs,
                "buckets": {str(k): v for k, v in (self.buckets or {}).items()}}


class Engine:
    """Static-shape generation for a trained ``SigmaModel`` (see the module docstring).

    Args:
        model: a ``SigmaModel`` (mode "sigma", "gr_id" or "gr_sid").
        device: where to run (default: the model's device).
        dtype: weights and key/value dtype (default bfloat16 on CUDA, float32 on CPU).
        num_beams, top_m, tau, adaptive, sigma_min: as for ``Recommender`` (``adaptive=False``
            is the "without APF" variant; ``tau`` defaults to the model's).
        top_n: the most results a call may ask for (GR(SID) searches ``max(num_beams, top_n)``
            beams; a call asking fewer gets the first ones).
        max_batch: requests per run (larger calls are split, keeping a user's requests
            together); the key/value buffers are sized for it.
        max_prompt: longest prompt in tokens (buffers are sized for it).
        batch_buckets: the batch sizes runs are padded to (default: powers of two up to
            ``max_batch`` on CUDA, where each bucket is a CUDA graph; every size on CPU, where
            padding rows would cost compute and there is nothing to capture).
        length_multiple: prompt parts are padded to a multiple of this (default 32 on CUDA,
            8 on CPU).
        reuse_prefix: run a user part shared by several requests once (default True).
        cuda_graphs: capture each bucket's program (default: on CUDA).
        backend: force a backend for the ops (beam step, apf_fuse).
    """

    def __init__(self, model, *, device=None, dtype: torch.dtype | None = None,
                 num_beams: int = 10, top_m: int = 50, top_n: int = 20,
                 tau: float | None = None, adaptive: bool = True, sigma_min: float = 1e-3,
                 max_batch: int | None = None, max_prompt: int = 256,
                 batch_buckets: Sequence[int] | None = None, length_multiple: int | None = None,
                 reuse_prefix: bool = True, cuda_graphs: bool | None = None,
                 backend: str | None = None):
        for name, value in (("num_beams", num_beams), ("top_m", top_m), ("top_n", top_n),
                            ("max_prompt", max_prompt)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        device = torch.device(device) if device is not None else model.device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        on_cuda = device.type == "cuda"
        dtype = dtype or (torch.bfloat16 if on_cuda else torch.float32)
        self.device, self.dtype = device, dtype
        self.model = model.to(device=device, dtype=dtype).eval()
        self.mode = model.config.mode
        self.runner = DecoderRunner(model.backbone)
        self.num_beams, self.top_m, self.top_n = num_beams, top_m, top_n
        self.tau = float(tau if tau is not None else model.config.tau)
        self.adaptive, self.sigma_min = bool(adaptive), float(sigma_min)
        self.backend = backend
        self.max_batch = int(max_batch or (64 if on_cuda else 16))
        self.max_prompt = max_prompt
        self.length_multiple = int(length_multiple or (32 if on_cuda else 8))
        if batch_buckets is None:
            batch_buckets = ([1 << i for i in range(self.max_batch.bit_length())
                              if 1 << i < self.max_batch] + [self.max_batch]) if on_cuda \
                else range(1, self.max_batch + 1)
        self.batch_buckets = sorted({int(b) for b in batch_buckets})
        if self.batch_buckets[0] < 1 or self.batch_buckets[-1] != self.max_batch:
            raise ValueError(f"batch_buckets must be sizes >= 1 ending at max_batch "
                             f"({self.max_batch}); got {list(batch_buckets)}")
        self.reuse_prefix = bool(reuse_prefix)
        self.cuda_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs a CUDA device")
        self.stats = EngineStats(buckets={})

        with torch.no_grad():
            self._tables()
        if self.mode == "sigma" and self.bucket_table is None and self.cuda_graphs:
            # prefixes too many for a device table are looked up on the host: not capturable
            if cuda_graphs:
                raise ValueError(f"cuda_graphs=True needs a prefix space of at most "
                                 f"{_DENSE_BUCKET_TABLE} (codebook size ** prefix length)")
            self.cuda_graphs = False
        self.width = self._width()
        self._allocate()
        self._graphs: dict = {}
        self._pool = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_run(cls, run_dir, variant: str = "sigma", **options) -> "Engine":
        """An engine for a trained variant of a run directory (``no_apf``: the sigma model with
        ``adaptive=False``); ``num_beams`` and ``top_m`` default to the run's eval settings."""
        from ..rec.pipeline import load_variant, run_config

        cfg = run_config(run_dir)["eval"]
        options.setdefault("num_beams", cfg["num_beams"])
        options.setdefault("top_m", cfg["top_m"])
        options.setdefault("adaptive", variant != "no_apf")
        return cls(load_variant(run_dir, variant), **options)

    def _tables(self):
        """Everything fixed per model: item embedding table, unit item vectors, trie, index,
        and the device lookup of prefix -> bucket."""
        model, dev = self.model, self.device
        self.vocab = model.vocab
        self.item_table = model.item_embeddings().to(self.dtype)          # ṽ, [N, H]
        v = F.normalize(model.item_embeddings().float(), dim=-1)
        self.item_vectors = v                                              # [N, H] unit rows
        codes = model.codes.cpu()
        self.trie = PrefixTrie(codes.numpy(), codebook_size=self.vocab.codebook_size).to(dev)
        self.index = None
        self.bucket_table = None
        if self.mode == "sigma":
            self.index = ItemIndex(v.cpu().contiguous(), codes.numpy()).to(dev)
            k, levels = self.vocab.codebook_size, codes.shape[1]
            if k ** levels <= _DENSE_BUCKET_TABLE:
                table = torch.full((k ** levels,), -1, dtype=torch.int64)
                prefixes = self.index.prefixes.cpu()
                table[self._prefix_keys(prefixes)] = torch.arange(prefixes.shape[0])
                self.bucket_table = table.to(dev)
        if self.mode == "gr_sid":
            leaves = self.trie.stats()["max_items_per_leaf"]
            if leaves != 1:
                raise ValueError(f"GR(SID) generation needs one item per full semantic ID; this "
                                 f"model's codes put up to {leaves} items on one ID")
        self.query_token = int(model.query_token_id)
        # vocabulary id of code 0 per level, on the device (SIDVocab.token_ids checks values on
        # the host, which a CUDA graph capture cannot do)
        self.level_offsets = torch.tensor(self.vocab.token_offsets, dtype=torch.int64,
                                          device=dev)

    def _prefix_keys(self, codes: torch.Tensor) -> torch.Tensor:
        k = self.vocab.codebook_size
        key = torch.zeros(codes.shape[:-1], dtype=torch.int64, device=codes.device)
        for level in range(codes.shape[-1]):
            key = key * k + codes[..., level]
        return key

    def _width(self) -> int:
        if self.mode == "gr_sid":
            return max(self.num_beams, self.top_n)
        return self.num_beams

    def _allocate(self):
        """The key/value buffers, sized once for (max_batch, max_prompt) prompts and the
        mode's beams: prompt [layers, max_batch, kv_heads, max_prompt, d] and beam
        [layers, max_batch * width, kv_heads, beam_len, d], keys and values each."""
        run, dev, dt = self.runner, self.device, self.dtype
        layers, kvh, d = len(run.layers), run.num_kv_heads, run.head_dim
        levels = self.trie.num_levels
        beam_len = {"sigma": levels + 1, "gr_sid": max(levels - 1, 1), "gr_id": 1}[self.mode]
        shape_p = (layers, self.max_batch, kvh, self.max_prompt, d)
        shape_b = (layers, self.max_batch * self.width, kvh, beam_len, d)
        self.prompt_k = torch.zeros(shape_p, dtype=dt, device=dev)
        self.prompt_v = torch.zeros(shape_p, dtype=dt, device=dev)
        self.beam_k = torch.zeros(shape_b, dtype=dt, device=dev)
        self.beam_v = torch.zeros(shape_b, dtype=dt, device=dev)

    def memory_bytes(self) -> int:
        """Bytes held by the key/value buffers."""
        return sum(t.numel() * t.element_size()
                   for t in (self.prompt_k, self.prompt_v, self.beam_k, self.beam_v))

    def __repr__(self) -> str:
        return (f"Engine(mode={self.mode!r}, device={self.device}, dtype={self.dtype}, "
                f"num_beams={self.num_beams}, top_m={self.top_m}, top_n={self.top_n}, "
                f"max_batch={self.max_batch}, max_prompt={self.max_prompt}, "
                f"cuda_graphs={self.cuda_graphs})")

    # ----------------------------------------------------------------------- requests
    def _encode(self, sample) -> _Prompt:
        e = self.model.encode(sample, with_label=False)
        ids = list(e.input_ids)
        slots = [-1] * len(ids)
        for pos, item in zip(e.item_slots, e.item_ids):
            slots[pos] = item
        if self.mode == "gr_id":
            ids.append(self.query_token)
            slots.append(-1)
        if len(ids) > self.max_prompt:
            raise ValueError(f"a prompt of {len(ids)} tokens is longer than this engine's "
                             f"max_prompt={self.max_prompt} (Engine(max_prompt=...))")
        cut = min(e.history_end, len(ids) - 1) if self.reuse_prefix else 0
        allowed = getattr(sample, "allowed", None)
        return _Prompt((tuple(ids[:cut]), tuple(slots[:cut])), (ids[cut:], slots[cut:]),
                       None if allowed is None else np.asarray(allowed, dtype=np.int64))

    def _chunks(self, prompts: list[_Prompt]) -> list[list[int]]:
        """Request indices per run: at most max_batch each, a user's requests together
        (unless one user alone has more than max_batch)."""
        groups: dict = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p.shared, []).append(i)
        chunks, cur = [], []
        for members in groups.values():
            while members:
                if len(cur) + len(members) > self.max_batch and cur:
                    chunks.append(cur)
                    cur = []
                take = members[: self.max_batch - len(cur)]
                members = members[len(take):]
                cur += take
        if cur:
            chunks.append(cur)
        return chunks

    def _bucket_size(self, n: int) -> int:
        return next(b for b in self.batch_buckets if b >= n)

    def _packs(self, prompts: list[_Prompt]) -> list[tuple[int, list[int]]]:
        """(shared length, request indices) of each pack: requests with the same user part,
        the part extended to everything they have in common (the instruction's first tokens
        are often shared too), as many requests per pack as fit in max_prompt tokens."""
        if not self.reuse_prefix:
            return [(0, [i]) for i in range(len(prompts))]
        groups: dict = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p.shared, []).append(i)
        packs = []
        for members in groups.values():
            full = [prompts[i].shared[0] + tuple(prompts[i].own[0]) for i in members]
            slots = [prompts[i].shared[1] + tuple(prompts[i].own[1]) for i in members]
            cut = len(prompts[members[0]].shared[0])
            limit = min(len(f) for f in full) - 1
            while cut < limit and all(f[cut] == full[0][cut] and s[cut] == slots[0][cut]
                                      for f, s in zip(full, slots)):
                cut += 1
            cur, length = [], cut
            for i, f in zip(members, full):
                own = len(f) - cut
                if cur and length + own > self.max_prompt:
                    packs.append((cut, cur))
                    cur, length = [], cut
                cur.append(i)
                length += own
            packs.append((cut, cur))
        return packs

    def _inputs(self, prompts: list[_Prompt]) -> tuple[_Bucket, dict]:
        """Host tensors of one run, padded to its bucket: the packs (rows of the prompt pass,
        each a user part followed by the own parts of some of its requests) and, per request,
        where its prompt lies in its pack."""
        n = len(prompts)
        packs = self._packs(prompts)
        full = [(p.shared[0] + tuple(p.own[0]), p.shared[1] + tuple(p.own[1])) for p in prompts]
        pack_lens = [cut + sum(len(full[i][0]) - cut for i in members) for cut, members in packs]
        r = self._bucket_size(n)
        pb = self._bucket_size(len(packs))
        lp = min(_round_up(max(pack_lens), self.length_multiple), self.max_prompt)
        t = min(_round_up(max(len(f[0]) for f in full), self.length_multiple), self.max_prompt)
        masked = any(p.allowed is not None for p in prompts)
        bucket = _Bucket(pb, lp, r, t, masked)
        pad = int(self.model.tokenizer.pad_token_id or 0)
        ids = torch.full((pb, lp), pad, dtype=torch.int64)
        slots = torch.full((pb, lp), -1, dtype=torch.int64)
        seg = torch.full((pb, lp), -2, dtype=torch.int64)    # -1 user part, r request r, -2 pad
        pos = torch.zeros((pb, lp), dtype=torch.int64)
        seg[:, 0] = -1                                        # padding packs: one live token
        req_pack = torch.zeros(r, dtype=torch.int64)
        req_src = torch.zeros((r, t), dtype=torch.int64)
        req_len = torch.ones(r, dtype=torch.int64)
        req_last = torch.zeros(r, dtype=torch.int64)
        for k, (cut, members) in enumerate(packs):
            first = full[members[0]]
            ids[k, :cut] = torch.tensor(first[0][:cut], dtype=torch.int64)
            slots[k, :cut] = torch.tensor(first[1][:cut], dtype=torch.int64)
            seg[k, :cut] = -1
            pos[k, :cut] = torch.arange(cut)
            at = cut
            for i in members:
                f_ids, f_slots = full[i]
                m = len(f_ids) - cut
                ids[k, at:at + m] = torch.tensor(f_ids[cut:], dtype=torch.int64)
                slots[k, at:at + m] = torch.tensor(f_slots[cut:], dtype=torch.int64)
                seg[k, at:at + m] = i
                pos[k, at:at + m] = torch.arange(cut, cut + m)
                req_pack[i] = k
                req_src[i, :cut] = torch.arange(cut)
                req_src[i, cut:cut + m] = torch.arange(at, at + m)
                req_len[i] = cut + m
                req_last[i] = at + m - 1
                at += m
        inp = {"pack_ids": ids, "pack_slots": slots, "pack_seg": seg, "pack_pos": pos,
               "req_pack": req_pack, "req_src": req_src, "req_len": req_len,
               "req_last": req_last}
        if masked:
            allowed = torch.ones((r, self.model.num_items), dtype=torch.bool)
            allowed[:n] = allowed_masks([p for p in prompts], self.model.num_items)
            inp["allowed"] = allowed
        self.stats.shared_requests += n - len(packs)
        return bucket, inp

    # ------------------------------------------------------------------ the program
    def _embed(self, ids: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        tok = self.runner.embed_tokens(ids)
        items = self.item_table[slots.clamp(min=0)]
        return torch.where((slots >= 0)[..., None], items, tok)

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """Boolean 'may attend' -> additive mask in the model's dtype."""
        zero = torch.zeros((), dtype=self.dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(self.dtype).min)

    def _prompt_pass(self, b: _Bucket, inp: dict):
        """One forward over the packs; each request's prompt keys/values are then gathered
        into its row of the prompt buffer. Returns (last hidden [R, H], prompt length [R], the
        beams' mask over the prompt keys [R, 1, 1, T])."""
        run, dev = self.runner, self.device
        r, t, lp = b.requests, b.prompt_len, b.pack_len
        seg = inp["pack_seg"]
        ar = torch.arange(lp, device=dev)
        # a token sees the earlier tokens of the user part and of its own request
        ok = (ar[None, :] <= ar[:, None])[None] & (
            (seg[:, None, :] == -1) | (seg[:, None, :] == seg[:, :, None]))
        mask = self._mask(ok)[:, None]                                   # [P, 1, Lp, Lp]
        pack_of, src = inp["req_pack"][:, None], inp["req_src"]

        def att(i, q, k, v):
            self.prompt_k[i, :r, :, :t] = k[pack_of, :, src].permute(0, 2, 1, 3)
            self.prompt_v[i, :r, :, :t] = v[pack_of, :, src].permute(0, 2, 1, 3)
            return attend(q, [KeySet(k, v, mask)], run.scaling, run.nrep)

        h = run.forward(self._embed(inp["pack_ids"], inp["pack_slots"]), inp["pack_pos"], att)
        last = h[inp["req_pack"], inp["req_last"]]
        prompt_len = inp["req_len"]
        key_ok = torch.arange(t, device=dev)[None, :] < prompt_len[:, None]
        return last, prompt_len, self._mask(key_ok)[:, None, None, :]

    def _beam_forward(self, tokens: torch.Tensor, positions: torch.Tensor, r: int, t: int,
                      prompt_mask: torch.Tensor, past: int, causal: bool) -> torch.Tensor:
        """Forward of beam tokens [R*W, Lq] on top of their request's prompt (keys read in
        place) and the beam buffer's first ``past`` positions; the new tokens' keys go to
        beam positions [past, past + Lq). Returns hidden states [R*W, Lq, H]."""
        run = self.runner
        rows, lq = tokens.shape
        w = rows // r
        end = past + lq
        own = None
        if causal and lq > 1:
            ar = torch.arange(end, device=self.device)
            own = self._mask(ar[None, :] <= (past + torch.arange(lq, device=self.device))[:, None])
            own = own[None, None]  # [1, 1, Lq, past + Lq]

        def att(i, q, k, v):
            self.beam_k[i, :rows, :, past:end] = k
            self.beam_v[i, :rows, :, past:end] = v
            return attend(q, [KeySet(self.prompt_k[i, :r, :, :t], self.prompt_v[i, :r, :, :t],
                                     prompt_mask, groups=w),
                              KeySet(self.beam_k[i, :rows, :, :end], self.beam_v[i, :rows, :, :end],
                                     own)], run.scaling, run.nrep)

        emb = self.runner.embed_tokens(tokens)
        return run.forward(emb, positions, att)

    def _search(self, b: _Bucket, inp: dict, last, prompt_len, prompt_mask, levels: int,
                width: int):
        """Trie-constrained beam search over ``levels`` code levels: (codes [R, W, levels],
        scores [R, W], states [R, W])."""
        r, t, dev = b.requests, b.prompt_len, self.device
        allowed_nodes = None
        if b.masked:
            allowed_nodes = self.trie.allowed_nodes(inp["allowed"])
        logits = self.runner.head_rows(last, self.vocab.level_slice(0))[:, None, :]
        scores = torch.zeros((r, 1), dtype=torch.float32, device=dev)
        states = torch.zeros((r, 1), dtype=torch.int64, device=dev)
        codes = torch.empty((r, 1, 0), dtype=torch.int64, device=dev)
        for level in range(levels):
            if level:
                tok = codes[:, :, -1].clamp(min=0) + self.vocab.token_offsets[level - 1]
                pos = (prompt_len[:, None] + (level - 1)).repeat_interleave(width, 0)
                h = self._beam_forward(tok.reshape(-1, 1), pos, r, t, prompt_mask,
                                       past=level - 1, causal=False)
                logits = self.runner.head_rows(h[:, 0], self.vocab.level_slice(level))
                logits = logits.view(r, width, -1)
            step = constrained_beam_step(logits, scores, states, self.trie, beam_width=width,
                                         allowed=allowed_nodes, normalize="full",
                                         on_empty="pad", backend=self.backend)
            parent = step.parent.clamp(min=0)
            codes = torch.cat([torch.gather(codes, 1, parent[..., None].expand(-1, -1, level)),
                               step.token[..., None]], dim=2)
            codes = codes.masked_fill((step.parent < 0)[..., None], -1)
            if level and level < levels - 1:  # the beams' own tokens follow their parents
                flat = (torch.arange(r, device=dev)[:, None] * width + parent).reshape(-1)
                self.beam_k[:, :r * width, :, :level] = self.beam_k[:, flat, :, :level]
                self.beam_v[:, :r * width, :, :level] = self.beam_v[:, flat, :, :level]
            scores, states = step.scores, step.states
        return codes, scores, states

    def _program(self, b: _Bucket, inp: dict) -> dict:
        last, prompt_len, prompt_mask = self._prompt_pass(b, inp)
        r, dev, model = b.requests, self.device, self.model
        if self.mode == "gr_id":
            q = model.query_embeddings(last).float()
            sims = q @ self.item_vectors.T
            if b.masked:
                sims = sims.masked_fill(~inp["allowed"], float("-inf"))
            n = min(self.top_n, sims.shape[1])
            scores, items = torch.sort(sims, dim=1, descending=True, stable=True)
            scores, items = scores[:, :n], items[:, :n]
            items = items.masked_fill(torch.isinf(scores), -1)
            if n < self.top_n:
                items = F.pad(items, (0, self.top_n - n), value=-1)
                scores = F.pad(scores, (0, self.top_n - n), value=float("-inf"))
            return {"item_ids": items, "scores": scores}
        levels = self.trie.num_levels
        codes, scores, states = self._search(b, inp, last, prompt_len, prompt_mask, levels,
                                             self.width)
        if self.mode == "gr_sid":
            live = states >= 0
            first = self.trie.item_perm[self.trie.item_begin[states.clamp(min=0)]]
            items = torch.where(live, first, torch.full_like(first, -1))
            return {"item_ids": items, "scores": scores.float()}
        # SIGMA step 2: <prefix_k><q> for every beam, on the request's prompt keys.
        k = self.width
        block = torch.cat([codes.clamp(min=0) + self.level_offsets[:codes.shape[2]],
                           torch.full((r, k, 1), self.query_token, dtype=torch.int64,
                                      device=dev)], dim=2)                       # [R, K, l+1]
        lq = block.shape[2]
        pos = (prompt_len[:, None] + torch.arange(lq, device=dev)).repeat_interleave(k, 0)
        t = b.prompt_len
        h = self._beam_forward(block.reshape(r * k, lq), pos, r, t, prompt_mask, past=0,
                               causal=True)
        queries = model.query_embeddings(h[:, -1]).float().reshape(r, k, -1)
        # Step 3: in-bucket retrieval + adaptive probabilistic fusion.
        phi = scores.float()
        if self.bucket_table is not None:
            buckets = self.bucket_table[self._prefix_keys(codes.clamp(min=0))]
            buckets = buckets.masked_fill((codes < 0).any(-1), -1)
        else:  # a prefix space too large for a table: looked up on the host
            buckets = self.index.bucket_of(codes.cpu()).to(dev)
        phi = phi.masked_fill(buckets < 0, float("-inf"))
        q_in = torch.where(torch.isinf(phi)[..., None], torch.ones_like(queries), queries)
        item_ids, log_p, _ = apf_fuse(phi, buckets.clamp(min=0), q_in.contiguous(), self.index,
                                      top_m=self.top_m, top_n=self.top_n, tau=self.tau,
                                      adaptive=self.adaptive, sigma_min=self.sigma_min,
                                      allowed=inp.get("allowed"), backend=self.backend)
        return {"item_ids": item_ids, "scores": log_p, "prefixes": codes,
                "prefix_scores": scores.float(), "queries": queries}

    # --------------------------------------------------------------------- running
    def _run(self, bucket: _Bucket, inp: dict) -> dict:
        return self._execute(bucket, {k: v.to(self.device, non_blocking=True)
                                      for k, v in inp.items()})

    def _execute(self, bucket: _Bucket, inp: dict) -> dict:
        """The bucket's program on device inputs: run eagerly, or (CUDA graphs) copy the
        inputs into the captured graph's input tensors and replay it."""
        if not self.cuda_graphs:
            return self._program(bucket, inp)
        entry = self._graphs.get(bucket)
        if entry is None:
            entry = self._capture(bucket, inp)
        graph, static_in, static_out = entry
        for key, value in inp.items():
            static_in[key].copy_(value)
        graph.replay()
        return static_out

    def _capture(self, bucket: _Bucket, inp: dict):
        """Warm up the bucket's program on a side stream, then capture it in a CUDA graph whose
        inputs are copies of ``inp`` (refilled before every replay)."""
        static_in = {k: v.clone() for k, v in inp.items()}
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._program(bucket, static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self._program(bucket, static_in)
        self._graphs[bucket] = (graph, static_in, static_out)
        self.stats.graphs += 1
        return self._graphs[bucket]

    @torch.no_grad()
    def __call__(self, samples, *, top_n: int | None = None) -> Recommendations:
        """Recommendations for ``TaskSample``-like requests, in their order (see the module
        docstring); ``top_n`` <= the engine's ``top_n`` (default: it)."""
        top_n = self.top_n if top_n is None else top_n
        if isinstance(top_n, bool) or not isinstance(top_n, int) or not 1 <= top_n <= self.top_n:
            raise ValueError(f"top_n must be an int in [1, {self.top_n}] (the engine's top_n); "
                             f"got {top_n!r}")
        samples = list(samples)
        if not samples:
            raise ValueError("no requests given")
        prompts = [self._encode(s) for s in samples]
        n = len(samples)
        out: dict = {}
        for chunk in self._chunks(prompts):
            _threads.adapt()
            bucket, inp = self._inputs([prompts[i] for i in chunk])
            res = self._run(bucket, inp)
            self.stats.batches += 1
            self.stats.requests += len(chunk)
            self.stats.padded_requests += bucket.requests - len(chunk)
            self.stats.buckets[bucket] = self.stats.buckets.get(bucket, 0) + 1
            idx = torch.tensor(chunk)
            for key, value in res.items():
                value = value[:len(chunk)].cpu()
                if key not in out:
                    out[key] = torch.empty((n, *value.shape[1:]), dtype=value.dtype)
                out[key][idx] = value
        return Recommendations(out["item_ids"][:, :top_n], out["scores"][:, :top_n],
                               out.get("prefixes"), out.get("prefix_scores"),
                               out.get("queries"))

    def warmup(self, samples) -> "Engine":
        """Run (and on CUDA capture) the buckets these requests fall into."""
        self(samples)
        return self

