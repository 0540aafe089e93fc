"""constrained_beam_search and SIDConstrainedLogitsProcessor on tiny random Hugging Face LMs.

The models are randomly initialised from a config (2 layers, hidden 32, vocab 300), so every
test runs in well under a second on 2 cores. Semantic-ID codes sit in the vocabulary at
per-level offsets (code c of level l = token OFFSETS[l] + c).
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections import defaultdict

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import sigma_fast as sf  # noqa: E402
from sigma_fast import SIDVocab  # noqa: E402

from conftest import backend_params  # noqa: E402

VOCAB = 300
K, L = 8, 3
OFFSETS = (100, 108, 116)  # disjoint ranges per level
PROMPT_LENGTHS = (7, 4, 9)
SCORE_TOL = dict(rtol=1e-5, atol=1e-4)


def _tiny_model(kind: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  pad_token_id=0, bos_token_id=2, eos_token_id=1)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    # A random init gives nearly uniform logits; scale the head so beams separate clearly
    # (no float near-ties between different SIDs).
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return _tiny_model("llama")


@pytest.fixture(scope="module")
def catalog():
    rng = np.random.default_rng(7)
    codes = rng.integers(0, K, size=(40, L))
    codes[5] = codes[3]  # two items share a full code (one leaf)
    return codes


@pytest.fixture(scope="module")
def trie(catalog):
    return sf.PrefixTrie(catalog, codebook_size=K)


def _prompts(lengths=PROMPT_LENGTHS, seed=3):
    """Left-padded batch of prompts of the given lengths: (input_ids, attention_mask, rows)."""
    rng = np.random.default_rng(seed)
    rows = [torch.tensor(rng.integers(3, 100, size=n)) for n in lengths]
    t = max(lengths)
    ids = torch.zeros((len(rows), t), dtype=torch.int64)
    mask = torch.zeros((len(rows), t), dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = r
        mask[i, t - len(r):] = 1
    return ids, mask, rows


def _teacher_forced(model, prompt, codes, *, normalize="full"):
    """Summed log-probability of every code row [D, l] after one (unpadded) prompt, computed
    by feeding prompt + SID tokens in one forward pass (no cache, no beams)."""
    codes = torch.as_tensor(codes, dtype=torch.int64)
    d, levels = codes.shape
    tokens = codes + torch.tensor(OFFSETS[:levels])
    x = torch.cat([prompt.expand(d, -1), tokens[:, :-1]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=x).logits.float()
    n = prompt.shape[0]
    total = torch.zeros(d)
    for lv in range(levels):
        row = logits[:, n - 1 + lv]
        if normalize == "full":
            lp = torch.log_softmax(row[:, OFFSETS[lv]:OFFSETS[lv] + K], -1)[
                torch.arange(d), codes[:, lv]]
        else:  # "vocab"
            lp = torch.log_softmax(row, -1)[torch.arange(d), tokens[:, lv]]
        total += lp
    return total


def _enumerate(model, prompt, catalog, levels, *, mask=None, normalize="full"):
    """All distinct allowed prefixes of length ``levels``, best first: (codes [D, l], scores)."""
    rows = catalog if mask is None else catalog[np.asarray(mask)]
    distinct = np.unique(rows[:, :levels], axis=0)
    scores = _teacher_forced(model, prompt, distinct, normalize=normalize)
    order = sorted(range(len(distinct)), key=lambda i: (-float(scores[i]), tuple(distinct[i])))
    return torch.as_tensor(distinct[order]), scores[order]


def _assert_matches_enumeration(result, b, codes, scores):
    d = codes.shape[0]
    live = result.scores[b] > -math.inf
    assert int(live.sum()) == min(d, result.scores.shape[1])
    n = int(live.sum())
    assert torch.equal(result.codes[b, :n], codes[:n])
    torch.testing.assert_close(result.scores[b, :n], scores[:n], **SCORE_TOL)
    assert bool((result.codes[b, n:] == -1).all())


# ------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("normalize", ["full", "vocab"])
def test_exhaustive_full_depth(model, trie, catalog, normalize):
    ids, mask, rows = _prompts()
    distinct = len(np.unique(catalog, axis=0))
    w = distinct + 3  # more beams than SIDs: the search must return every SID, best first
    res = sf.constrained_beam_search(model, ids, mask, trie, token_offsets=OFFSETS,
                                     beam_width=w, normalize=normalize)
    assert res.codes.shape == (3, w, L) and res.scores.shape == (3, w)
    for b, prompt in enumerate(rows):
        codes, scores = _enumerate(model, prompt, catalog, L, normalize=normalize)
        _assert_matches_enumeration(res, b, codes, scores)
        # item ids: the first catalog row with that code; all of them via beam_items
        for w_ in range(distinct):
            same = np.nonzero((catalog == res.codes[b, w_].numpy()).all(1))[0]
            assert int(res.item_ids[b, w_]) == same[0]
            assert sorted(res.beam_items(b, w_).tolist()) == same.tolist()
        assert bool((res.item_ids[b, distinct:] == -1).all())


def test_small_beam_is_top_of_enumeration(model, trie, catalog):
    """W smaller than the catalog: beam search may miss the global optimum in general, but its
    beams are real SIDs with exact teacher-forced scores, sorted, unique."""
    ids, mask, rows = _prompts()
    res = sf.constrained_beam_search(model, ids, mask, trie, token_offsets=OFFSETS, beam_width=4)
    for b, prompt in enumerate(rows):
        got = res.codes[b]
        assert len({tuple(c) for c in got.tolist()}) == 4
        assert all((catalog == c).all(1).any() for c in got.numpy())
        torch.testing.assert_close(res.scores[b], _teacher_forced(model, prompt, got), **SCORE_TOL)
        assert bool((torch.diff(res.scores[b]) <= 0).all())


def _plain_beam_search(model, prompt, catalog, w, levels):
    """Beam search written the obvious way: no cache, every beam's whole sequence re-run at
    every level, a dict of valid next codes, ties to the smaller parent then smaller code."""
    children = defaultdict(set)
    for row in catalog.tolist():
        for lv in range(levels):
            children[tuple(row[:lv])].add(row[lv])
    beams = [((), 0.0)]
    for lv in range(levels):
        seqs = torch.stack([torch.cat([prompt, torch.tensor(c, dtype=torch.int64)
                                       + torch.tensor(OFFSETS[:lv], dtype=torch.int64)])
                            for c, _ in beams])
        with torch.no_grad():
            logits = model(input_ids=seqs).logits[:, -1, OFFSETS[lv]:OFFSETS[lv] + K].float()
        logp = torch.log_softmax(logits, -1)
        cands = [(np.float32(s) + np.float32(logp[i, c]), i, c, codes + (c,))
                 for i, (codes, s) in enumerate(beams) for c in sorted(children[codes])]
        cands.sort(key=lambda x: (-x[0], x[1], x[2]))
        beams = [(codes, float(sc)) for sc, _, _, codes in cands[:w]]
    return torch.tensor([c for c, _ in beams]), torch.tensor([s for _, s in beams])


@pytest.mark.parametrize("w,levels", [(3, 3), (5, 3), (4, 2)])
def test_equals_plain_beam_search(model, trie, catalog, w, levels):
    """W below the number of SIDs: the same beams as a cache-free beam search (this checks the
    cache expansion and the reordering by parent)."""
    ids, mask, rows = _prompts()
    res = sf.constrained_beam_search(model, ids, mask, trie, token_offsets=OFFSETS, beam_width=w,
                                     num_levels=levels)
    for b, prompt in enumerate(rows):
        codes, scores = _plain_beam_search(model, prompt, catalog, w, levels)
        assert torch.equal(res.codes[b], codes)
        torch.testing.assert_close(res.scores[b], scores, **SCORE_TOL)


@pytest.mark.parametrize("backend", backend_params(exclude=("cuda", "triton")))
def test_backend_matches_reference(model, trie, backend):
    ids, mask, _ = _prompts()
    kw = dict(token_offsets=OFFSETS, beam_width=6)
    ref = sf.constrained_beam_search(model, ids, mask, trie, backend="reference", **kw)
    got = sf.constrained_beam_search(model, ids, mask, trie, backend=backend, **kw)
    assert torch.equal(got.codes, ref.codes)
    assert torch.equal(got.item_ids, ref.item_ids)
    torch.testing.assert_close(got.scores, ref.scores, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_batched_left_padding_equals_one_by_one(kind, trie):
    model = _tiny_model(kind)
    ids, mask, rows = _prompts()
    batched = sf.constrained_beam_search(model, ids, mask, trie, token_offsets=OFFSETS,
                                         beam_width=5)
    for b, prompt in enumerate(rows):
        single = sf.constrained_beam_search(model, prompt[None], None, trie,
                                            token_offsets=OFFSETS, beam_width=5)
        assert torch.equal(batched.codes[b], single.codes[0])
        torch.testing.assert_close(batched.scores[b], single.scores[0], **SCORE_TOL)


def test_narrow_head_is_exact_and_restored(model, trie, catalog):
    """The search computes only the code rows of the LM head; the model gets its head back,
    also when the search raises."""
    ids, mask, _ = _prompts()
    head = model.get_output_embeddings()
    kw = dict(token_offsets=OFFSETS, beam_width=6)
    a = sf.constrained_beam_search(model, ids, mask, trie, narrow_head=True, **kw)
    b = sf.constrained_beam_search(model, ids, mask, trie, narrow_head=False, **kw)
    assert torch.equal(a.codes, b.codes)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-6, atol=1e-5)
    assert model.get_output_embeddings() is head
    with pytest.raises(ValueError, match="request 0"):
        sf.constrained_beam_search(model, ids, mask, trie, narrow_head=True,
                                   allowed=torch.zeros(len(catalog), dtype=torch.bool), **kw)
    assert model.get_output_embeddings() is head and model.lm_head is head


def test_prefill_once(model, trie):
    """1 prefill of the B prompts + one single-token forward per later level, never B*W
    prefills."""
    calls = []
    forward = model.forward

    @functools.wraps(forward)
    def counting(*args, **kwargs):
        calls.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    ids, mask, _ = _prompts()
    w = 5
    model.forward = counting
    try:
        res = sf.constrained_beam_search(model, ids, mask, trie, token_offsets=OFFSETS,
                                         beam_width=w)
        full = list(calls)
        calls.clear()
        sf.constrained_beam_search(model, ids, mask, trie, token_offsets=OFFSETS, beam_width=w,
                                   num_levels=1)
        one = list(calls)
    finally:
        del model.forward
    assert full == [tuple(ids.shape)] + [(3 * w, 1)] * (L - 1)
    assert res.num_forward_calls == L
    assert one == [tuple(ids.shape)]


def test_prefix_only(model, trie, catalog):
    ids, mask, rows = _prompts()
    res = sf.constrained_beam_search(model, ids, mask, trie, token_offsets=OFFSETS,
                                     beam_width=70, num_levels=2)
    assert res.codes.shape == (3, 70, 2) and res.item_ids is None
    assert res.num_forward_calls == 2
    for b, prompt in enumerate(rows):
        codes, scores = _enumerate(model, prompt, catalog, 2)
        _assert_matches_enumeration(res, b, codes, scores)
        for w in range(codes.shape[0]):  # the bucket of each prefix
            bucket = trie.item_perm[res.item_begin[b, w]:res.item_end[b, w]]
            assert torch.equal(bucket, trie.items_under(res.codes[b, w]))
            assert torch.equal(res.beam_items(b, w), bucket)


def test_return_cache_continues_every_beam(model, trie):
    """Feeding next_token_ids with the returned cache gives the logits teacher forcing gives
    (what step 2 of three-step generation does with the <q> token)."""
    ids, mask, rows = _prompts()
    res = sf.constrained_beam_search(model, ids, mask, trie, token_offsets=OFFSETS,
                                     beam_width=3, num_levels=2, return_cache=True)
    am = torch.cat([res.attention_mask, res.attention_mask.new_ones((9, 1))], 1)
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5.x: cache
    with torch.no_grad():
        out = model(input_ids=res.next_token_ids[:, None], attention_mask=am,
                    position_ids=res.position_ids[:, None], use_cache=True,
                    **{cache_kw: res.past_key_values})
    for b, prompt in enumerate(rows):
        for w in range(3):
            seq = torch.cat([prompt, res.codes[b, w] + torch.tensor(OFFSETS[:2])])
            with torch.no_grad():
                ref = model(input_ids=seq[None]).logits[0, -1]
            torch.testing.assert_close(out.logits[b * 3 + w, -1], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("levels", [1, 2])
def test_return_cache_prompt_is_the_prompts_own_cache(model, trie, levels):
    """return_cache="prompt" hands back one cache row per request holding the prompt alone
    (the beams' tokens cropped away): a token fed at position_ids continues the prompt."""
    ids, mask, rows = _prompts()
    res = sf.constrained_beam_search(model, ids, mask, trie, token_offsets=OFFSETS,
                                     beam_width=3, num_levels=levels, return_cache="prompt")
    assert res.next_token_ids is None and torch.equal(res.attention_mask, mask)
    assert res.past_key_values.get_seq_length() == ids.shape[1]
    token = torch.tensor([[OFFSETS[0] + 1]] * len(rows))
    am = torch.cat([mask, mask.new_ones((len(rows), 1))], 1)
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    with torch.no_grad():
        out = model(input_ids=token, attention_mask=am, position_ids=res.position_ids[:, None],
                    use_cache=True, **{cache_kw: res.past_key_values})
        for b, prompt in enumerate(rows):
            ref = model(input_ids=torch.cat([prompt, token[b]])[None]).logits[0, -1]
            torch.testing.assert_close(out.logits[b, -1], ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="return_cache must be"):
        sf.constrained_beam_search(model, ids, mask, trie, token_offsets=OFFSETS,
                                   beam_width=3, return_cache="all")


# ---------------------------------------------------------------------- allowed subsets


def test_allowed_shared_and_per_request(model, trie, catalog):
    ids, mask, rows = _prompts()
    rng = np.random.default_rng(11)
    per_request = torch.as_tensor(rng.random((3, len(catalog))) < 0.3)
    per_request[0, 5] = True  # item 5 shares its leaf with item 3
    per_request[0, 3] = False
    shared = per_request[1]
    for allowed in (shared, per_request):
        res = sf.constrained_beam_search(model, ids, mask, trie, token_offsets=OFFSETS,
                                         beam_width=45, allowed=allowed)
        for b, prompt in enumerate(rows):
            m = allowed if allowed.dim() == 1 else allowed[b]
            codes, scores = _enumerate(model, prompt, catalog, L, mask=m)
            _assert_matches_enumeration(res, b, codes, scores)
            live = res.item_ids[b] >= 0
            assert bool(m[res.item_ids[b][live]].all())  # only allowed items, ever
            for w in range(int(live.sum())):
                assert bool(m[res.beam_items(b, w)].all())
    # the shared leaf: item 5 is allowed, item 3 (same code, earlier row) is not
    res = sf.constrained_beam_search(model, ids, mask, trie, token_offsets=OFFSETS,
                                     beam_width=45, allowed=per_request)
    assert 5 in res.item_ids[0].tolist() and 3 not in res.item_ids[0].tolist()


def test_allowed_nothing(model, trie, catalog):
    ids, mask, _ = _prompts()
    allowed = torch.ones((3, len(catalog)), dtype=torch.bool)
    allowed[1] = False
    with pytest.raises(ValueError, match="request 1"):
        sf.constrained_beam_search(model, ids, mask, trie, token_offsets=OFFSETS, beam_width=4,
                                   allowed=allowed)
    res = sf.constrained_beam_search(model, ids, mask, trie, token_offsets=OFFSETS, beam_width=4,
                                     allowed=allowed, on_empty="pad")
    assert bool(res.scores[1].isneginf().all()) and bool((res.codes[1] == -1).all())
    assert bool((res.item_ids[1] == -1).all()) and bool((res.item_ids[[0, 2]] >= 0).all())


def test_fewer_items_than_beams_pads(model):
    small = sf.PrefixTrie(np.array([[1, 2, 3], [1, 2, 4], [5, 0, 0]]), codebook_size=K)
    ids, mask, rows = _prompts()
    res = sf.constrained_beam_search(model, ids, mask, small, token_offsets=OFFSETS, beam_width=6)
    for b, prompt in enumerate(rows):
        codes, scores = _enumerate(model, prompt, np.array([[1, 2, 3], [1, 2, 4], [5, 0, 0]]), L)
        _assert_matches_enumeration(res, b, codes, scores)
    assert bool((res.item_ids[:, 3:] == -1).all()) and bool(res.scores[:, 3:].isneginf().all())


def test_invariant_to_catalog_row_order(model, catalog):
    perm = np.random.default_rng(5).permutation(len(catalog))
    a = sf.PrefixTrie(catalog, codebook_size=K)
    b = sf.PrefixTrie(catalog[perm], item_ids=perm, codebook_size=K)  # same ids, other order
    ids, mask, _ = _prompts()
    ra = sf.constrained_beam_search(model, ids, mask, a, token_offsets=OFFSETS, beam_width=8)
    rb = sf.constrained_beam_search(model, ids, mask, b, token_offsets=OFFSETS, beam_width=8)
    assert torch.equal(ra.codes, rb.codes)
    assert torch.equal(ra.scores, rb.scores)
    for bb in range(3):
        for w in range(8):
            assert sorted(ra.beam_items(bb, w).tolist()) == sorted(rb.beam_items(bb, w).tolist())


# -------------------------------------------------------------- the LogitsProcessor


def _dict_trie_fn(catalog, prompt_length, *, masks=None, eos=None):
    """The usual prefix_allowed_tokens_fn: a dict from generated prefix to next tokens."""
    def build(rows):
        nxt = defaultdict(set)
        for row in rows:
            for lv in range(L):
                nxt[tuple(int(c) for c in row[:lv])].add(OFFSETS[lv] + int(row[lv]))
        return {k: sorted(v) for k, v in nxt.items()}

    tries = [build(catalog if m is None else catalog[np.asarray(m)])
             for m in (masks if masks is not None else [None])]

    def fn(batch_id, sent):
        gen = sent[prompt_length:].tolist()
        if len(gen) >= L:
            return [eos]
        prefix = tuple(t - OFFSETS[i] for i, t in enumerate(gen))
        return tries[batch_id if masks is not None else 0][prefix]

    return fn


def _generate(model, ids, mask, w, new_tokens, **kw):
    return model.generate(ids, attention_mask=mask, num_beams=w, num_return_sequences=w,
                          do_sample=False, top_k=None, top_p=None, max_new_tokens=new_tokens,
                          length_penalty=0.0, output_scores=True, return_dict_in_generate=True,
                          pad_token_id=0, **kw)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("per_request_mask", [False, True])
def test_processor_identical_to_prefix_allowed_tokens_fn(kind, per_request_mask, trie, catalog):
    model = _tiny_model(kind, seed=1)
    ids, mask, _ = _prompts()
    w, t = 4, ids.shape[1]
    masks = None
    if per_request_mask:
        rng = np.random.default_rng(2)
        masks = torch.as_tensor(rng.random((3, len(catalog))) < 0.5)
    proc = sf.SIDConstrainedLogitsProcessor(trie, OFFSETS, t, allowed=masks, num_beams=w)
    ours = _generate(model, ids, mask, w, L, logits_processor=[proc])
    theirs = _generate(model, ids, mask, w, L,
                       prefix_allowed_tokens_fn=_dict_trie_fn(catalog, t, masks=masks))
    assert torch.equal(ours.sequences, theirs.sequences)
    assert torch.equal(ours.sequences_scores, theirs.sequences_scores)
    for a, b in zip(ours.scores, theirs.scores):
        assert torch.equal(a, b)
    gen = SIDVocab(OFFSETS, K).codes(ours.sequences[:, t:])
    for r, row in enumerate(gen.numpy()):  # every output is an allowed catalog item
        hit = (catalog == row).all(1)
        if masks is not None:
            hit &= masks[r // w].numpy()
        assert hit.any()


def test_processor_with_eos_after_last_level(model, trie, catalog):
    ids, mask, _ = _prompts()
    t, eos = ids.shape[1], 1
    proc = sf.SIDConstrainedLogitsProcessor(trie, OFFSETS, t, eos_token_id=eos, num_beams=3)
    ours = _generate(model, ids, mask, 3, L + 2, logits_processor=[proc], eos_token_id=eos)
    theirs = _generate(model, ids, mask, 3, L + 2, eos_token_id=eos,
                       prefix_allowed_tokens_fn=_dict_trie_fn(catalog, t, eos=eos))
    assert torch.equal(ours.sequences, theirs.sequences)
    assert torch.equal(ours.sequences_scores, theirs.sequences_scores)
    assert bool((ours.sequences[:, t + L] == eos).all())


def test_processor_past_last_level_without_eos_raises(model, trie):
    ids, mask, _ = _prompts()
    proc = sf.SIDConstrainedLogitsProcessor(trie, OFFSETS, ids.shape[1])
    with pytest.raises(ValueError, match="max_new_tokens=3"):
        _generate(model, ids, mask, 2, L + 1, logits_processor=[proc])


def test_search_vocab_normalize_equals_generate(model, trie):
    """normalize="vocab" scores tokens as generate does: same beams, same scores."""
    ids, mask, _ = _prompts()
    w, t = 5, ids.shape[1]
    proc = sf.SIDConstrainedLogitsProcessor(trie, OFFSETS, t, num_beams=w)
    gen = _generate(model, ids, mask, w, L, logits_processor=[proc])
    res = sf.constrained_beam_search(model, ids, mask, trie, token_offsets=OFFSETS, beam_width=w,
                                     normalize="vocab")
    codes = SIDVocab(OFFSETS, K).codes(gen.sequences[:, t:]).reshape(3, w, L)
    assert torch.equal(res.codes, codes)
    torch.testing.assert_close(res.scores.reshape(-1), gen.sequences_scores, **SCORE_TOL)


def test_processor_mask_is_vectorized_trie_walk(trie, catalog):
    """Direct check of the token mask, including rows that left the trie."""
    proc = sf.SIDConstrainedLogitsProcessor(trie, OFFSETS, 2)
    fn = _dict_trie_fn(catalog, 2)
    rows = [[5, 6], [5, 6, OFFSETS[0] + int(catalog[0, 0])],
            [5, 6, OFFSETS[0] + int(catalog[4, 0]), OFFSETS[1] + int(catalog[4, 1])]]
    for r in rows:
        x = torch.tensor([r, r])
        got = proc.allowed_token_mask(x, VOCAB)
        want = torch.zeros(VOCAB, dtype=torch.bool)
        want[fn(0, x[0])] = True
        assert torch.equal(got[0], want) and torch.equal(got[1], want)
    off_trie = torch.tensor([[5, 6, 3]])  # not a level-0 code: nothing allowed
    assert not bool(proc.allowed_token_mask(off_trie, VOCAB).any())
    scores = torch.randn(1, VOCAB)
    assert bool(proc(off_trie, scores).isneginf().all())


def test_check_generation_config():
    gc = transformers.GenerationConfig(do_sample=True, top_k=50, top_p=0.9)
    with pytest.warns(UserWarning, match="top_k=50"):
        problems = sf.check_generation_config(gc)
    assert any("top_p" in p for p in problems)
    clean = transformers.GenerationConfig(do_sample=False, top_k=None, top_p=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sf.check_generation_config(clean) == []
    assert sf.check_generation_config(transformers.GenerationConfig(repetition_penalty=1.3),
                                      warn=False)


# ------------------------------------------------------------------------- SIDVocab


def test_sid_vocab_round_trip_and_add_tokens():
    v = SIDVocab(OFFSETS, K)
    codes = torch.tensor([[1, 2, 3], [7, 0, 5]])
    ids = v.token_ids(codes)
    assert ids.tolist() == [[101, 110, 119], [107, 108, 121]]
    assert torch.equal(v.codes(ids), codes)
    assert v.codes(torch.tensor([[99, 116]])).tolist() == [[-1, -1]]  # 116 is level 2's, not 1's
    assert v.level_slice(1) == slice(108, 116) and v.vocab_end == 124
    with pytest.raises(IndexError, match=r"\[0, 8\)"):
        v.token_ids(torch.tensor([[8]]))

    tokenizers = pytest.importorskip("tokenizers")
    base = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "a": 1},
                                                            unk_token="[UNK]"))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=base)
    added = SIDVocab.add_tokens(tok, 2, 3)
    assert added.token_offsets == (2, 5) and len(tok) == 8
    assert tok.convert_ids_to_tokens([5 + 2]) == ["<b_2>"]  # level 1 code 2
    assert SIDVocab.add_tokens(tok, 2, 3).token_offsets == (2, 5) and len(tok) == 8  # idempotent


# ------------------------------------------------------------------------ bad input


def test_bad_input(model, trie, catalog):
    ids, mask, _ = _prompts()
    kw = dict(token_offsets=OFFSETS, beam_width=3)
    search = sf.constrained_beam_search
    right = torch.flip(mask, [1])
    with pytest.raises(ValueError, match="left-padded"):
        search(model, ids, right, trie, **kw)
    with pytest.raises(TypeError, match="PrefixTrie"):
        search(model, ids, mask, catalog, **kw)
    with pytest.raises(TypeError, match="input_ids must be int64 or int32; got float32"):
        search(model, ids.float(), mask, trie, **kw)
    with pytest.raises(ValueError, match="attention_mask must have"):
        search(model, ids, mask[:, 1:], trie, **kw)
    with pytest.raises(ValueError, match="one entry per trie level"):
        search(model, ids, mask, trie, token_offsets=OFFSETS[:2], beam_width=3)
    with pytest.raises(ValueError, match="beyond the model's vocabulary of 300"):
        search(model, ids, mask, trie, token_offsets=(100, 108, 295), beam_width=3)
    with pytest.raises(ValueError, match="num_levels must be <= 3"):
        search(model, ids, mask, trie, num_levels=4, **kw)
    with pytest.raises(ValueError, match="beam_width must be >= 1"):
        search(model, ids, mask, trie, token_offsets=OFFSETS, beam_width=0)
    with pytest.raises(ValueError, match="normalize must be one of"):
        search(model, ids, mask, trie, normalize="softmax", **kw)
    with pytest.raises(ValueError, match=r"allowed must be a mask \[trie.item_id_bound = 40\]"):
        search(model, ids, mask, trie, allowed=torch.ones(39, dtype=torch.bool), **kw)
    with pytest.raises(TypeError, match="allowed must be bool"):
        search(model, ids, mask, trie, allowed=torch.ones(40), **kw)
    with pytest.raises(TypeError, match="token_offsets must be a sequence"):
        search(model, ids, mask, trie, token_offsets=100, beam_width=3)
    with pytest.raises(ValueError, match="must be >= 0"):
        search(model, ids, mask, trie, token_offsets=(100, -1, 116), beam_width=3)
    with pytest.raises(TypeError, match="PrefixTrie"):
        sf.SIDConstrainedLogitsProcessor(catalog, OFFSETS, 3)
    with pytest.raises(ValueError, match=r"allowed must be a mask \[trie.item_id_bound = 40\] "
                                         r".* or \[B, trie.item_id_bound"):
        sf.SIDConstrainedLogitsProcessor(trie, OFFSETS, 3, allowed=torch.ones(3, dtype=torch.bool))
