"""PrefixTrie: the C++ build against the reference layout, queries, item masks, persistence."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sigma_fast as sf
from sigma_fast import reference
from sigma_fast.testing import clustered_codes
from sigma_fast.trie import ARRAYS, CONFIG_FILE, TENSORS_FILE

CODES = st.tuples(st.integers(1, 40), st.integers(1, 4), st.integers(1, 6),
                  st.integers(0, 2**31 - 1))


def _codes(n, levels, k, seed):
    return np.random.default_rng(seed).integers(0, k, size=(n, levels))


def _assert_layout_equal(trie, want):
    for name in ARRAYS:
        got = getattr(trie, name)
        assert got.dtype == torch.int64, name
        assert np.array_equal(got.numpy(), want[name]), (name, got.tolist(), want[name].tolist())
    assert trie.num_nodes == want["num_nodes"]


@given(codes_args=CODES, int32=st.booleans(), strided=st.booleans())
def test_build_matches_reference(codes_args, int32, strided):
    n, levels, k, seed = codes_args
    codes = _codes(n, levels, k, seed).astype(np.int32 if int32 else np.int64)
    if strided:  # rows of a wider array
        wide = np.zeros((n, levels + 3), dtype=codes.dtype)
        wide[:, 1:levels + 1] = codes
        codes = wide[:, 1:levels + 1]
    trie = sf.PrefixTrie(torch.from_numpy(codes), codebook_size=k)
    _assert_layout_equal(trie, reference.build_trie(codes, k))
    assert (trie.num_items, trie.num_levels, trie.codebook_size) == (n, levels, k)
    assert trie.nodes_per_level[0] == 1 and sum(trie.nodes_per_level) == trie.num_nodes


def test_layout_of_a_small_catalog():
    codes = np.array([[1, 0], [0, 2], [1, 0], [0, 1]])
    trie = sf.PrefixTrie(codes)
    # depth 1: (0) = 1, (1) = 2; depth 2: (0,1) = 3, (0,2) = 4, (1,0) = 5
    assert trie.level_offsets.tolist() == [0, 1, 3, 6]
    assert trie.child_offsets.tolist() == [0, 2, 4, 5, 5, 5, 5]
    assert trie.child_tokens.tolist() == [0, 1, 1, 2, 0]
    assert trie.child_nodes.tolist() == [1, 2, 3, 4, 5]
    assert trie.node_parent.tolist() == [-1, 0, 0, 1, 1, 2]
    assert trie.item_perm.tolist() == [3, 1, 0, 2]  # sorted codes; duplicates keep row order
    assert trie.item_begin.tolist() == [0, 0, 2, 0, 1, 2]
    assert trie.item_end.tolist() == [4, 2, 4, 1, 2, 4]
    assert trie.root_children.tolist() == [1, 2, -1]
    assert trie.codebook_size == 3 and trie.nodes_per_level == [1, 2, 3]


def test_duplicated_codes_share_a_leaf():
    codes = np.array([[2, 1, 0]] * 5 + [[2, 1, 1]] * 2 + [[0, 0, 0]])
    trie = sf.PrefixTrie(codes, codebook_size=3)
    assert trie.nodes_per_level == [1, 2, 2, 3]
    assert sorted(trie.items_under([2, 1, 0]).tolist()) == [0, 1, 2, 3, 4]
    assert trie.items_under([2, 1, 0]).tolist() == [0, 1, 2, 3, 4]  # stable: row order
    stats = trie.stats()
    assert stats["distinct_codes"] == 3 and stats["max_items_per_leaf"] == 5
    assert stats["shared_leaves"] == 2


def test_stats_report_branching():
    codes = np.array([[0, 0], [0, 1], [0, 2], [1, 0]])
    s = sf.PrefixTrie(codes).stats()
    assert s["nodes_per_level"] == [1, 2, 4]
    assert s["mean_children"] == [2.0, 2.0] and s["min_children"] == [2, 1]
    assert s["max_children"] == [2, 3]
    assert (s["num_items"], s["num_levels"], s["num_nodes"], s["codebook_size"]) == (4, 2, 7, 3)


@given(codes_args=CODES, data=st.data())
def test_walk_matches_reference(codes_args, data):
    n, levels, k, seed = codes_args
    codes = _codes(n, levels, k, seed)
    trie = sf.PrefixTrie(codes, codebook_size=k)
    length = data.draw(st.integers(0, levels))
    rng = np.random.default_rng(seed + 1)
    queries = np.concatenate([codes[:, :length], rng.integers(-1, k + 1, size=(7, length))])
    got = trie.walk(queries)
    assert isinstance(got, np.ndarray) and got.dtype == np.int64
    want = reference.trie_walk(queries, trie.child_offsets.numpy(), trie.child_tokens.numpy(),
                               trie.child_nodes.numpy())
    assert np.array_equal(got, want)
    assert (got[:n] >= 0).all()  # every catalog prefix exists
    lo, hi = trie.level_range(length)
    assert ((got[:n] >= lo) & (got[:n] < hi)).all()
    got_t = trie.walk(torch.from_numpy(queries.astype(np.int32)))
    assert isinstance(got_t, torch.Tensor) and np.array_equal(got_t.numpy(), want)


@given(codes_args=CODES, data=st.data())
def test_items_under_and_prefix_buckets(codes_args, data):
    n, levels, k, seed = codes_args
    codes = _codes(n, levels, k, seed)
    ids = np.random.default_rng(seed).permutation(n) * 3 + 1  # caller ids, not rows
    trie = sf.PrefixTrie(codes, item_ids=ids, codebook_size=k)
    length = data.draw(st.integers(0, levels))
    prefix = codes[data.draw(st.integers(0, n - 1)), :length].tolist()
    want = ids[(codes[:, :length] == prefix).all(axis=1)]
    assert sorted(trie.items_under(prefix).tolist()) == sorted(want.tolist())
    assert trie.items_under([k] * max(length, 1)).numel() == 0  # token outside the trie
    bucket_codes, offsets, item_ids = trie.prefix_buckets(length)
    uniq = np.unique(codes[:, :length], axis=0) if length else np.zeros((1, 0), np.int64)
    assert np.array_equal(bucket_codes.numpy(), uniq)
    assert offsets[0] == 0 and offsets[-1] == n and len(offsets) == len(uniq) + 1
    row_of = {int(i): r for r, i in enumerate(ids)}
    for j, p in enumerate(uniq):
        members = item_ids[offsets[j]:offsets[j + 1]].tolist()
        assert all((codes[row_of[m], :length] == p).all() for m in members)
        assert len(members) == int((codes[:, :length] == p).all(axis=1).sum())
    lo, hi = trie.level_range(length)
    assert np.array_equal(trie.node_prefixes(torch.arange(lo, hi)).numpy(), uniq)


@given(codes_args=CODES, m=st.integers(1, 3), density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
       custom_ids=st.booleans())
def test_allowed_nodes_matches_reference(codes_args, m, density, custom_ids):
    n, levels, k, seed = codes_args
    codes = _codes(n, levels, k, seed)
    rng = np.random.default_rng(seed)
    ids = rng.choice(2 * n, size=n, replace=False) if custom_ids else None
    trie = sf.PrefixTrie(codes, item_ids=ids, codebook_size=k)
    masks = rng.random((m, trie.item_id_bound)) < density
    got = trie.allowed_nodes(masks)
    assert got.dtype == bool and got.shape == (m, trie.num_nodes)
    want = reference.allowed_nodes(masks, trie.item_perm.numpy(), trie.item_begin.numpy(),
                                   trie.item_end.numpy())
    assert np.array_equal(got, want)
    assert np.array_equal(trie.allowed_nodes(masks[0]), want[0])
    assert np.array_equal(trie.allowed_nodes(torch.from_numpy(masks)).numpy(), want)


@pytest.mark.parametrize("n", [1, 63, 64, 65, 127, 128, 129, 1000])
def test_allowed_nodes_word_boundaries(n):
    """Every node range against a direct count, across 64-bit word boundaries, and the
    vectorized torch path (used for masks on an accelerator) against the C++ one."""
    codes = clustered_codes(n, 3, 8, clusters=7, noise=0.3, seed=n)
    trie = sf.PrefixTrie(codes, codebook_size=8)
    rng = np.random.default_rng(n)
    masks = np.stack([rng.random(n) < d for d in (0.0, 0.01, 0.2, 0.9, 1.0)])
    got = trie.allowed_nodes(masks)
    in_order = masks[:, trie.item_perm.numpy()]
    counts = np.concatenate([np.zeros((5, 1), int), np.cumsum(in_order, axis=1)], axis=1)
    want = counts[:, trie.item_end.numpy()] > counts[:, trie.item_begin.numpy()]
    assert np.array_equal(got, want)
    assert got[-1].all() and not got[0].any()


def test_allowed_nodes_without_the_core_uses_the_vectorized_path(monkeypatch):
    import sigma_fast.trie as trie_mod

    codes = clustered_codes(300, 3, 8, clusters=9, seed=3)
    trie = sf.PrefixTrie(codes, codebook_size=8)
    masks = np.random.default_rng(0).random((2, 300)) < 0.1
    want = trie.allowed_nodes(masks)
    monkeypatch.setattr(trie_mod, "load_core", lambda: None)
    assert np.array_equal(trie.allowed_nodes(masks), want)
    assert np.array_equal(trie.walk(codes[:9]), np.asarray(
        sf.PrefixTrie(codes, codebook_size=8).walk(codes[:9])))


@given(codes_args=CODES)
def test_invariant_to_catalog_row_order(codes_args):
    n, levels, k, seed = codes_args
    codes = _codes(n, levels, k, seed)
    perm = np.random.default_rng(seed).permutation(n)
    a = sf.PrefixTrie(codes, codebook_size=k)
    b = sf.PrefixTrie(codes[perm], item_ids=perm, codebook_size=k)  # same items, shuffled rows
    for name in ARRAYS:
        if name != "item_perm":
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    lo, hi = a.level_range(levels)
    for leaf in range(lo, hi):
        r = slice(int(a.item_begin[leaf]), int(a.item_end[leaf]))
        assert sorted(a.item_perm[r].tolist()) == sorted(b.item_perm[r].tolist())


def test_to_device_round_trip():
    trie = sf.PrefixTrie(clustered_codes(50, 3, 5, seed=1), codebook_size=5)
    assert trie.to("cpu") is trie and trie.device == torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device for .to('cuda')")
    gpu = trie.to("cuda")
    assert gpu.device.type == "cuda" and gpu.child_offsets.is_cuda
    assert gpu.to("cpu") is trie
    mask = torch.rand(50) < 0.3
    assert torch.equal(gpu.allowed_nodes(mask.cuda()).cpu(), trie.allowed_nodes(mask))
    assert torch.equal(gpu.allowed_nodes(mask).cpu(), trie.allowed_nodes(mask))


# ------------------------------------------------------------------------- persistence


def test_save_load_round_trip(tmp_path):
    codes = clustered_codes(500, 4, 16, clusters=40, seed=2)
    trie = sf.PrefixTrie(codes, item_ids=np.arange(500) + 7, codebook_size=16)
    trie.save(tmp_path / "t")
    loaded = sf.PrefixTrie.load(tmp_path / "t")
    for name in ARRAYS:
        assert torch.equal(getattr(loaded, name), getattr(trie, name)), name
    assert loaded.stats() == trie.stats() and loaded.item_id_bound == trie.item_id_bound
    assert np.array_equal(loaded.walk(codes[:20]), trie.walk(codes[:20]))
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [TENSORS_FILE, CONFIG_FILE]


@pytest.fixture
def saved(tmp_path):
    trie = sf.PrefixTrie(clustered_codes(200, 3, 8, clusters=20, seed=5), codebook_size=8)
    return trie.save(tmp_path / "trie")


def test_load_rejects_a_corrupt_tensor_file(saved):
    path = saved / TENSORS_FILE
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        sf.PrefixTrie.load(saved)


def test_load_rejects_truncated_and_missing_files(saved):
    (saved / TENSORS_FILE).write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="checksum mismatch"):
        sf.PrefixTrie.load(saved)
    (saved / TENSORS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="trie.safetensors"):
        sf.PrefixTrie.load(saved)
    with pytest.raises(FileNotFoundError, match="trie directory"):
        sf.PrefixTrie.load(saved / "nope")


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.update(format="other"), "expected format"),
    (lambda c: c.update(format_version=99), "newer"),
    (lambda c: c.update(num_nodes=-3), "field 'num_nodes' must be an int >= 1"),
    (lambda c: c.update(num_items=199), "item_perm must be int64 [199]"),
])
def test_load_rejects_bad_configs(saved, edit, words):
    cfg = json.loads((saved / CONFIG_FILE).read_text())
    edit(cfg)
    (saved / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        sf.PrefixTrie.load(saved)
    (saved / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        sf.PrefixTrie.load(saved)


@pytest.mark.parametrize("name, corrupt, words", [
    ("child_tokens", lambda a: a.__setitem__(0, 99), "child_tokens must lie in"),
    ("child_offsets", lambda a: a.__setitem__(2, a[1] - 1), "child_offsets must start"),
    ("item_end", lambda a: a.__setitem__(3, 10**6), "item ranges"),
    ("item_perm", lambda a: a.__setitem__(0, -1), "item_perm must lie in"),
    ("node_parent", lambda a: a.__setitem__(-1, 0), "node_parent must match"),
    ("root_children", lambda a: a.__setitem__(0, -1), "root_children"),
])
def test_load_rejects_inconsistent_arrays_with_a_valid_checksum(saved, name, corrupt, words):
    """A file that passes the checksum but does not describe a trie (written by other code)
    must not reach the kernels."""
    import hashlib

    from safetensors.torch import load_file, save_file

    tensors = load_file(saved / TENSORS_FILE)
    corrupt(tensors[name])
    save_file(tensors, saved / TENSORS_FILE)
    cfg = json.loads((saved / CONFIG_FILE).read_text())
    cfg["tensors_sha256"] = hashlib.sha256((saved / TENSORS_FILE).read_bytes()).hexdigest()
    (saved / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not a consistent trie.*" + words):
        sf.PrefixTrie.load(saved)


# ---------------------------------------------------------------------------- bad input


Z = np.zeros((3, 2), np.int64)
BAD_CODES = [
    (np.array([[0, 1], [2, 3]]), dict(codebook_size=3), IndexError,
     "codes must lie in [0, 3); got 3"),
    (np.array([[0, -1]]), {}, IndexError, "codes must be >= 0; got -1 at index [0, 1]"),
    ([[0, 1], [2]], {}, ValueError, "rectangular [N, L]"),
    (np.array([0, 1, 2]), {}, ValueError, "codes must be 2-d [N, L]; got shape [3]"),
    (np.zeros((0, 3), np.int64), {}, ValueError, "at least one row"),
    (np.zeros((3, 0), np.int64), {}, ValueError, "at least one level"),
    (np.zeros((3, 2), np.float32), {}, TypeError, "codes must be int32 or int64; got float32"),
    (Z, dict(codebook_size=0), ValueError, "codebook_size must be >= 1"),
    (Z, dict(item_ids=np.arange(4)), ValueError, "item_ids must be 1-d [N] with N = 3"),
    (Z, dict(item_ids=np.array([0, -2, 1])), IndexError,
     "item_ids must be >= 0; got -2 at index [1]"),
    ("codes", {}, TypeError, "torch.Tensor or numpy.ndarray"),
]


@pytest.mark.parametrize("codes, kwargs, exc, words", BAD_CODES)
def test_build_rejects_bad_input(codes, kwargs, exc, words):
    with pytest.raises(exc) as info:
        sf.PrefixTrie(codes, **kwargs)
    assert words in str(info.value)


def test_queries_reject_bad_input():
    trie = sf.PrefixTrie(np.array([[0, 1], [1, 1]]))
    with pytest.raises(TypeError, match="tokens must be int32 or int64; got float32"):
        trie.walk(np.zeros((2, 1), np.float32))
    with pytest.raises(ValueError, match="at most L = 2 columns"):
        trie.walk(np.zeros((2, 3), np.int64))
    with pytest.raises(TypeError, match="item_mask must be bool; got int64"):
        trie.allowed_nodes(np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"item_mask must be a mask \[item_id_bound = 2\] "
                                         r".* or \[B, item_id_bound = 2\]"):
        trie.allowed_nodes(np.zeros(3, bool))
    with pytest.raises(ValueError, match="length must be <= 2"):
        trie.prefix_buckets(3)
    with pytest.raises(ValueError, match="same depth"):
        trie.node_prefixes(torch.tensor([1, 3]))
