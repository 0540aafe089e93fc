"""ItemIndex: layout, prefix -> bucket mapping, statistics, persistence and bad input."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sigma_fast as sf
import sigma_fast.item_index as index_mod
from sigma_fast import reference


def _data(n=50, d=6, buckets=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.integers(0, buckets, n)


def check_layout(index, emb, buckets, ids):
    """The documented layout, derived independently."""
    n = len(buckets)
    sizes = np.bincount(buckets, minlength=index.num_buckets)
    assert index.offsets.tolist() == [0, *np.cumsum(sizes).tolist()]
    order = np.argsort(buckets, kind="stable")
    assert index.item_ids.tolist() == ids[order].tolist()
    assert index.positions[order].tolist() == list(range(n))
    want = emb.astype(np.float64) / np.linalg.norm(emb.astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(index.embeddings.numpy()[index.positions.numpy()], want,
                               rtol=0, atol=2e-7)
    assert index.embeddings.dtype == torch.float32 and index.embeddings.is_contiguous()
    for t in (index.offsets, index.item_ids, index.positions):
        assert t.dtype == torch.int64


@given(n=st.integers(1, 40), d=st.integers(1, 9), buckets=st.integers(1, 6),
       seed=st.integers(0, 2**31 - 1), custom_ids=st.booleans())
def test_layout(n, d, buckets, seed, custom_ids):
    emb, codes = _data(n, d, buckets, seed)
    ids = np.random.default_rng(seed).permutation(3 * n)[:n] if custom_ids else np.arange(n)
    index = sf.ItemIndex(emb, codes, item_ids=ids if custom_ids else None,
                         num_buckets=buckets + 1)
    assert index.num_buckets == buckets + 1 and index.num_items == n and index.dim == d
    assert index.id_bound == ids.max() + 1
    check_layout(index, emb, codes, ids)
    # The C++ build and the NumPy reference build agree (up to float32 rounding of rows).
    r_emb, r_off, r_ids, r_pos = reference.build_item_index(emb, codes, buckets + 1,
                                                            ids if custom_ids else None)
    assert np.array_equal(r_off, index.offsets.numpy()) and np.array_equal(r_ids, index.item_ids)
    assert np.array_equal(r_pos, index.positions.numpy())
    np.testing.assert_allclose(r_emb, index.embeddings.numpy(), rtol=0, atol=1e-7)


def test_reference_build_is_used_without_the_core(monkeypatch):
    emb, codes = _data()
    monkeypatch.setattr(index_mod, "load_core", lambda: None)
    index = sf.ItemIndex(emb, codes)
    check_layout(index, emb, codes, np.arange(len(codes)))


def test_strided_and_torch_inputs():
    emb, codes = _data(40, 8)
    wide = np.zeros((40, 16), np.float32)
    wide[:, ::2] = emb
    a = sf.ItemIndex(torch.from_numpy(wide)[:, ::2], torch.from_numpy(codes.astype(np.int32)))
    b = sf.ItemIndex(emb, codes)
    for name in ("embeddings", "offsets", "item_ids", "positions"):
        assert torch.equal(getattr(a, name), getattr(b, name))


def test_multi_level_prefixes_and_bucket_of():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 4, (60, 2))
    emb = rng.standard_normal((60, 5)).astype(np.float32)
    index = sf.ItemIndex(emb, codes)
    distinct = sorted({tuple(c) for c in codes.tolist()})
    assert index.prefix_levels == 2 and index.num_buckets == len(distinct)
    assert [tuple(p) for p in index.prefixes.tolist()] == distinct  # lexicographic order
    bucket = index.bucket_of(codes)
    assert isinstance(bucket, np.ndarray) and bucket.shape == (60,)
    for i in range(60):
        assert tuple(index.prefixes[bucket[i]].tolist()) == tuple(codes[i])
    check_layout(index, emb, bucket, np.arange(60))
    # Shapes are kept, unknown prefixes map to -1, torch in -> torch out.
    missing = next((a, b) for a in range(6) for b in range(6) if (a, b) not in distinct)
    probe = torch.tensor([[list(distinct[0]), list(missing)], [[-1, 0], [99, 99]]])
    assert index.bucket_of(probe).tolist() == [[0, -1], [-1, -1]]
    with pytest.raises(ValueError, match=r"prefix must be \[\.\.\., 2\]"):
        index.bucket_of(np.zeros((3, 3), np.int64))
    # 1-d codes map to themselves.
    flat = sf.ItemIndex(emb, codes[:, 0], num_buckets=7)
    assert flat.prefixes is None and flat.prefix_levels == 0
    assert flat.bucket_of(np.array([0, 6, 7, -2])).tolist() == [0, 6, -1, -1]


def test_bucket_sizes_items_and_stats():
    emb, _ = _data(100, 4)
    codes = np.concatenate([np.zeros(60, int), np.full(30, 2), np.arange(10) % 5 + 3])
    index = sf.ItemIndex(emb, codes, num_buckets=10)
    sizes = index.bucket_sizes()
    assert sizes.tolist() == [60, 0, 30, 2, 2, 2, 2, 2, 0, 0]
    assert index.bucket_items(2).tolist() == list(range(60, 90))
    with pytest.raises(IndexError, match=r"bucket must lie in \[0, 10\); got 10"):
        index.bucket_items(10)
    s = index.stats()
    assert (s.num_items, s.num_buckets, s.empty_buckets, s.largest_bucket,
            s.largest_bucket_id) == (100, 10, 3, 60, 0)
    assert s.mean_bucket_size == pytest.approx(100 / 7)
    assert s.percentiles["p50"] == 2.0 and set(s.percentiles) == {"p50", "p90", "p99", "p99.9"}
    assert s.items_in_largest_1pct == pytest.approx(0.6)
    json.dumps(s.as_dict())
    assert "num_buckets=10" in repr(index)


def test_to_device_returns_self_when_already_there():
    emb, codes = _data()
    index = sf.ItemIndex(emb, codes)
    assert index.to("cpu") is index


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_cuda_and_back():
    emb, codes = _data()
    index = sf.ItemIndex(emb, codes)
    gpu = index.to("cuda")
    assert gpu.embeddings.is_cuda and gpu.offsets.is_cuda and gpu.item_ids.is_cuda
    back = gpu.to("cpu")
    assert torch.equal(back.embeddings, index.embeddings)
    built = sf.ItemIndex(torch.from_numpy(emb).cuda(), torch.from_numpy(codes).cuda())
    assert built.device.type == "cuda"


@pytest.mark.parametrize("levels", [1, 2])
def test_save_load_roundtrip(tmp_path, levels):
    emb, _ = _data(80, 6)
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 4, (80, 2)) if levels == 2 else rng.integers(0, 4, 80)
    ids = rng.permutation(500)[:80]
    index = sf.ItemIndex(emb, codes, item_ids=ids)
    index.save(tmp_path / "idx")
    loaded = sf.ItemIndex.load(tmp_path / "idx")
    for name in ("embeddings", "offsets", "item_ids", "positions"):
        assert torch.equal(getattr(loaded, name), getattr(index, name))
    assert loaded.id_bound == index.id_bound and loaded.prefix_levels == index.prefix_levels
    if levels == 2:
        assert torch.equal(loaded.prefixes, index.prefixes)
        assert np.array_equal(loaded.bucket_of(codes), index.bucket_of(codes))
    phi = rng.standard_normal((2, 3)).astype(np.float32)
    pids = rng.integers(0, index.num_buckets, (2, 3))
    q = rng.standard_normal((2, 3, 6)).astype(np.float32)
    a = sf.apf_fuse(phi, pids, q, index, top_m=3, top_n=5, tau=0.1)
    b = sf.apf_fuse(phi, pids, q, loaded, top_m=3, top_n=5, tau=0.1)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    # Saving again replaces the files in place.
    index.save(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == [
        "item_index.json", "item_index.safetensors"]


def _rewrite_tensors(directory, **changes):
    """Replace tensors in a saved index and fix the checksum, as a buggy writer would."""
    import hashlib

    from safetensors.torch import load, save

    path = directory / "item_index.safetensors"
    tensors = load(path.read_bytes())
    tensors.update(changes)
    blob = save(tensors)
    path.write_bytes(blob)
    cfg = json.loads((directory / "item_index.json").read_text())
    cfg["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
    (directory / "item_index.json").write_text(json.dumps(cfg))


def test_load_rejects_corrupt_files(tmp_path):
    emb, codes = _data(30, 4)
    index = sf.ItemIndex(emb, codes)
    d = tmp_path / "idx"

    def fresh():
        index.save(d)
        return d

    with pytest.raises(FileNotFoundError, match="expected an item index directory"):
        sf.ItemIndex.load(tmp_path / "nope")
    t = fresh() / "item_index.safetensors"
    t.write_bytes(t.read_bytes()[:100])
    with pytest.raises(ValueError, match="checksum .* does not match"):
        sf.ItemIndex.load(d)
    (fresh() / "item_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        sf.ItemIndex.load(d)
    cfg = json.loads((fresh() / "item_index.json").read_text())
    (d / "item_index.json").write_text(json.dumps({**cfg, "format": "other"}))
    with pytest.raises(ValueError, match="expected format 'sigma_fast.ItemIndex'"):
        sf.ItemIndex.load(d)
    (d / "item_index.json").write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99 is newer"):
        sf.ItemIndex.load(d)
    (d / "item_index.json").write_text(json.dumps({**cfg, "num_items": 31}))
    with pytest.raises(ValueError, match=r"embeddings must be float32 \[31, 4\]"):
        sf.ItemIndex.load(d)
    (fresh() / "item_index.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="expected a safetensors file"):
        sf.ItemIndex.load(d)
    off = index.offsets.clone()
    off[1] = off[2] + 1  # decreasing at position 2
    _rewrite_tensors(fresh(), offsets=off)
    with pytest.raises(ValueError, match="offsets must start at 0, be non-decreasing"):
        sf.ItemIndex.load(d)
    ids = index.item_ids.clone()
    ids[3] = ids[4]
    _rewrite_tensors(fresh(), item_ids=ids)
    with pytest.raises(ValueError, match="item_ids must be unique"):
        sf.ItemIndex.load(d)
    _rewrite_tensors(fresh(), embeddings=index.embeddings * 2)
    with pytest.raises(ValueError, match="finite unit-norm rows; row 0 has norm 2"):
        sf.ItemIndex.load(d)
    _rewrite_tensors(fresh(), positions=torch.zeros(30, dtype=torch.int64))
    with pytest.raises(ValueError, match="positions must be a permutation"):
        sf.ItemIndex.load(d)
    _rewrite_tensors(fresh(), extra=torch.zeros(1))
    with pytest.raises(ValueError, match="expected tensors"):
        sf.ItemIndex.load(d)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(embeddings=np.zeros((5, 3), np.float64)), TypeError, ["embeddings must be float32"]),
        (dict(embeddings=np.zeros((0, 3), np.float32), prefix_codes=np.zeros(0, np.int64)),
         ValueError, ["N >= 1", "[0, 3]"]),
        (dict(embeddings=np.ones(5, np.float32)), ValueError, ["embeddings must be 2-d", "[5]"]),
        (dict(prefix_codes=np.zeros(5, np.float32)), TypeError, ["prefix_codes must be int32 or int64"]),
        (dict(prefix_codes=np.zeros(4, np.int64)), ValueError, ["prefix_codes must be [N] or [N, l] with N = 5"]),
        (dict(prefix_codes=np.array([0, 1, -2, 0, 0])), ValueError, ["prefix_codes must be >= 0; got -2 at index [2]"]),
        (dict(num_buckets=2), ValueError, ["num_buckets must be > every prefix code (3); got 2"]),
        (dict(num_buckets=0), ValueError, ["num_buckets must be >= 1; got 0"]),
        (dict(prefix_codes=np.zeros((5, 2), np.int64), num_buckets=3), ValueError,
         ["num_buckets applies to 1-d prefix_codes only"]),
        (dict(item_ids=np.array([0, 1, 2, 2, 4])), ValueError, ["item_ids must be unique; got 2 more than once"]),
        (dict(item_ids=np.array([0, 1, -2, 3, 4])), ValueError, ["item_ids must be >= 0; got -2 at index 2"]),
        (dict(item_ids=np.arange(4)), ValueError, ["item_ids must be 1-d [N] with N = 5"]),
        (dict(prefix_codes=np.full((5, 3), 2**30)), ValueError, ["too many to combine"]),
    ],
)
def test_rejects_bad_input(kwargs, exc, words):
    args = dict(embeddings=np.ones((5, 3), np.float32), prefix_codes=np.array([0, 1, 3, 0, 1]))
    args.update(kwargs)
    emb, codes = args.pop("embeddings"), args.pop("prefix_codes")
    with pytest.raises(exc) as info:
        sf.ItemIndex(emb, codes, **args)
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("use_core", [True, False])
@pytest.mark.parametrize("bad, what", [(0.0, "is all zeros"), (np.nan, "has a non-finite value"),
                                       (np.inf, "has a non-finite value")])
def test_rejects_zero_and_non_finite_rows(monkeypatch, use_core, bad, what):
    if not use_core:
        monkeypatch.setattr(index_mod, "load_core", lambda: None)
    emb = np.ones((6, 3), np.float32)
    emb[4] = bad if bad == 0.0 else 1.0
    emb[4, 1] = bad
    emb[5] = 0.0  # a later bad row: the first one is reported
    with pytest.raises(ValueError, match=f"row 4 {what}"):
        sf.ItemIndex(emb, np.zeros(6, np.int64))
