"""The serving engine: same results as the eager Recommender in every mode (batch and length
padding, allowed subsets, prefix reuse), on the tiny model and on a SmolLM2-shaped model; clear
errors; and, where a GPU exists, CUDA graphs that replay without host synchronisation."""

import numpy as np
import pytest
import torch

from sigma_fast.testing import assert_topk_close

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 2e-5  # float32 rounding: our attention vs transformers' (sdpa), other batch shapes
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64)


@pytest.fixture(scope="module")
def pattern(tmp_path_factory):
    from sigma_fast.rec import HybridItemTokenizer
    from sigma_fast.rec.data import build_task_samples
    from sigma_fast.rec.grounding import hashed_text_features
    from sigma_fast.rec.synthetic import synthetic_dataset

    ds = synthetic_dataset(tmp_path_factory.mktemp("engine"), num_items=120, num_users=40,
                           min_length=6, max_length=14, max_history=6)
    items = HybridItemTokenizer(num_levels=3, codebook_size=6, iters=5).fit(
        hashed_text_features(ds.item_texts, 64), seed=0)
    test = build_task_samples(ds, "test")
    assert any(s.allowed is not None for s in test) and any(s.allowed is None for s in test)
    return ds, items, test


def _model(pattern, mode, *, prefix_len=1, shape=SMALL):
    from sigma_fast.rec.synthetic import synthetic_model

    ds, items, _ = pattern
    return synthetic_model(ds, shape=shape, mode=mode, items=items.variant(prefix_len),
                           hard_negatives=4)


def _same(got, want, what):
    assert_topk_close(got.item_ids, got.scores, want.item_ids, want.scores, atol=ATOL, what=what)


def _recommender(model, **kw):
    from sigma_fast.rec.generate import Recommender

    return Recommender(model, **kw)


@pytest.mark.parametrize("mode,adaptive", [("sigma", True), ("sigma", False), ("gr_id", True),
                                           ("gr_sid", True)])
def test_engine_matches_the_recommender(pattern, mode, adaptive):
    from sigma_fast.serving import Engine

    test = pattern[2]
    model = _model(pattern, mode)
    want = _recommender(model, num_beams=5, top_m=8, adaptive=adaptive, batch_size=7)(
        test, top_n=10)
    # coarse buckets and length rounding: batch and length padding in most runs
    engine = Engine(model, num_beams=5, top_m=8, top_n=10, adaptive=adaptive, max_batch=8,
                    batch_buckets=[2, 4, 8], length_multiple=16)
    got = engine(test)
    _same(got, want, f"{mode} (adaptive={adaptive})")
    assert engine.stats.padded_requests > 0 and engine.stats.shared_requests > 0
    if mode == "sigma":
        assert torch.equal(got.prefixes, want.prefixes)
        torch.testing.assert_close(got.prefix_scores, want.prefix_scores, atol=ATOL, rtol=0)
        torch.testing.assert_close(got.queries, want.queries, atol=ATOL, rtol=0)
    # every result is in the catalogue, allowed, and unique
    for s, row in zip(test, got.item_ids.tolist()):
        real = [i for i in row if i >= 0]
        assert len(set(real)) == len(real)
        assert all(0 <= i < model.num_items for i in real)
        if s.allowed is not None:
            assert set(real) <= set(np.asarray(s.allowed).tolist())
    # fewer results than the engine's top_n: the first ones
    few = engine(test[:5], top_n=3)
    assert torch.equal(few.item_ids, got.item_ids[:5, :3])


def test_two_level_prefixes_match_the_recommender(pattern):
    from sigma_fast.serving import Engine

    test = pattern[2]
    model = _model(pattern, "sigma", prefix_len=2)
    assert model.vocab.num_levels == 2
    want = _recommender(model, num_beams=4, top_m=6)(test, top_n=8)
    got = Engine(model, num_beams=4, top_m=6, top_n=8, max_batch=6, length_multiple=4)(test)
    _same(got, want, "prefix length 2")
    assert torch.equal(got.prefixes, want.prefixes)


def test_tasks_of_one_user_reuse_the_user_part_and_match_separate_requests(pattern):
    from sigma_fast.serving import Engine

    test = pattern[2]
    model = _model(pattern, "sigma")
    users = {}
    for s in test:
        users.setdefault(s.user, []).append(s)
    user, tasks = max(users.items(), key=lambda kv: len(kv[1]))
    assert len(tasks) >= 4
    engine = Engine(model, num_beams=5, top_m=8, top_n=10)
    together = engine(tasks)
    assert engine.stats.shared_requests == len(tasks) - 1
    alone = [Engine(model, num_beams=5, top_m=8, top_n=10)([t]) for t in tasks]
    for k, a in enumerate(alone):
        assert_topk_close(together.item_ids[k:k + 1], together.scores[k:k + 1], a.item_ids,
                          a.scores, atol=ATOL, what=f"task {tasks[k].task}")
    # no reuse at all gives the same answers too
    plain = Engine(model, num_beams=5, top_m=8, top_n=10, reuse_prefix=False)(tasks)
    _same(plain, together, "without prefix reuse")


def test_smollm2_shaped_model_matches_the_recommender(pattern):
    """SmolLM2-135M's shapes (hidden 576, 9 query / 3 key-value heads, MLP 1536), random
    weights, two layers."""
    from sigma_fast.rec.synthetic import SHAPES
    from sigma_fast.serving import Engine

    test = pattern[2]
    model = _model(pattern, "sigma", shape={**SHAPES["smollm2-135m"], "num_hidden_layers": 2})
    want = _recommender(model, num_beams=6, top_m=8)(test[:24], top_n=10)
    got = Engine(model, num_beams=6, top_m=8, top_n=10, max_batch=8)(test[:24])
    _same(got, want, "SmolLM2-shaped")


def test_bad_requests_and_settings_raise_clear_errors(pattern):
    from sigma_fast.serving import Engine

    test = pattern[2]
    model = _model(pattern, "sigma")
    engine = Engine(model, num_beams=3, top_m=4, top_n=5, max_prompt=64)
    with pytest.raises(ValueError, match=r"top_n must be an int in \[1, 5\]"):
        engine(test[:2], top_n=6)
    with pytest.raises(ValueError, match="no requests"):
        engine([])
    with pytest.raises(ValueError, match="max_prompt=8"):
        Engine(model, num_beams=3, top_m=4, top_n=5, max_prompt=8)(test[:1])
    with pytest.raises(ValueError, match="num_beams must be an int >= 1"):
        Engine(model, num_beams=0)
    with pytest.raises(ValueError, match="batch_buckets must be sizes >= 1 ending at max_batch"):
        Engine(model, max_batch=8, batch_buckets=[1, 4])
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        Engine(model, cuda_graphs=True, device="cpu")


def test_unsupported_backbones_are_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    from sigma_fast.serving.lm import DecoderRunner

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(NotImplementedError, match="Llama-style decoders .* GPT2LMHeadModel lacks"):
        DecoderRunner(gpt2)


# ------------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", ["sigma", "gr_id", "gr_sid"])
def test_cuda_graphs_replay_the_eager_program_without_host_sync(pattern, mode):
    from sigma_fast.serving import Engine

    test = pattern[2]
    model = _model(pattern, mode)
    eager = Engine(model, device="cuda", dtype=torch.float32, num_beams=5, top_m=8, top_n=10,
                   max_batch=8, cuda_graphs=False)
    want = eager(test)
    graphs = Engine(model, device="cuda", dtype=torch.float32, num_beams=5, top_m=8, top_n=10,
                    max_batch=8, cuda_graphs=True)
    first = graphs(test)          # captures
    assert graphs.stats.graphs > 0
    captured = graphs.stats.graphs
    bucket, inp = graphs._inputs([graphs._encode(s) for s in test[:8]])
    inp = {k: v.cuda() for k, v in inp.items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        graphs._execute(bucket, inp)   # a replay: any host synchronisation inside raises
    finally:
        torch.cuda.set_sync_debug_mode("default")
    again = graphs(test)          # replays
    assert graphs.stats.graphs == captured
    _same(first, want, f"{mode} graphs vs eager")
    _same(again, want, f"{mode} replay vs eager")
    cpu = _recommender(_model(pattern, mode), num_beams=5, top_m=8)(test, top_n=10)
    _same(want, cpu, f"{mode} cuda vs cpu")


@pytest.mark.gpu
@gpu
def test_bfloat16_engine_returns_allowed_unique_items(pattern):
    from sigma_fast.serving import Engine

    test = pattern[2]
    model = _model(pattern, "sigma")
    got = Engine(model, device="cuda", num_beams=5, top_m=8, top_n=10, max_batch=8)(test)
    assert got.item_ids.shape == (len(test), 10)
    for s, row in zip(test, got.item_ids.tolist()):
        real = [i for i in row if i >= 0]
        assert len(set(real)) == len(real)
        if s.allowed is not None:
            assert set(real) <= set(np.asarray(s.allowed).tolist())
