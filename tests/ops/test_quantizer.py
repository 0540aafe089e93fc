"""ResidualQuantizer training, statistics, persistence, and dedup_codes."""

import json

import numpy as np
import pytest
import torch

import sigma_fast as sf
from sigma_fast.testing import clustered_vectors


@pytest.fixture(scope="module")
def data():
    return clustered_vectors(2500, 12, clusters=40, seed=21)


def test_fit_is_deterministic_for_a_seed(data):
    a = sf.ResidualQuantizer().fit(data, 3, 16, iters=5, seed=7, progress=False)
    b = sf.ResidualQuantizer().fit(data, 3, 16, iters=5, seed=7, progress=False)
    c = sf.ResidualQuantizer().fit(data, 3, 16, iters=5, seed=8, progress=False)
    assert torch.equal(a.codebooks, b.codebooks)
    assert not torch.equal(a.codebooks, c.codebooks)


def test_fit_reduces_error_and_beats_random_codebooks(data):
    rq = sf.ResidualQuantizer().fit(data, 3, 16, iters=8, seed=0, progress=False)
    st = rq.stats(data)
    rng = np.random.default_rng(0)
    rand = sf.ResidualQuantizer(data[rng.choice(len(data), 48, replace=False)].reshape(3, 16, 12))
    assert st.mean_sq_error < 0.8 * rand.stats(data).mean_sq_error
    assert 0 < st.relative_error < 0.2
    assert rq.stats(data, beam_width=4).mean_sq_error <= st.mean_sq_error * (1 + 1e-6)


def test_more_iterations_do_not_hurt(data):
    e = [sf.ResidualQuantizer().fit(data, 2, 16, iters=it, seed=3, progress=False)
         .stats(data).mean_sq_error for it in (0, 2, 10)]
    assert e[2] <= e[1] * 1.001 and e[1] <= e[0] * 1.001


def test_beam_training(data):
    rq = sf.ResidualQuantizer().fit(data, 3, 8, iters=4, seed=0, beam_width=4, progress=False)
    assert rq.beam_width == 4 and rq.num_levels == 3
    codes = rq.encode(data[:20])
    assert codes.shape == (20, 3)


def test_dead_codewords_are_reseeded():
    # 30 distinct points, 16 codewords: k-means++ picks duplicates' far points; every codeword
    # must end up used.
    rng = np.random.default_rng(4)
    pts = rng.standard_normal((30, 4)).astype(np.float32)
    x = np.repeat(pts, 20, axis=0)
    rq = sf.ResidualQuantizer().fit(x, 1, 16, iters=10, seed=0, progress=False)
    st = rq.stats(x)
    assert st.used_fraction[0] == 1.0
    assert np.isfinite(rq.codebooks.numpy()).all()


def test_stats_fields(data):
    rq = sf.ResidualQuantizer().fit(data, 2, 8, iters=3, seed=0, progress=False)
    st = rq.stats(data)
    assert st.usage.shape == (2, 8) and st.usage.sum(axis=1).tolist() == [len(data)] * 2
    codes = rq.encode(data)
    distinct = len(np.unique(codes, axis=0))
    assert st.collision_rate == pytest.approx(1 - distinct / len(data))
    assert st.max_items_per_code == np.unique(codes, axis=0, return_counts=True)[1].max()
    json.dumps(st.as_dict())


def test_encode_decode_follow_input_kind(data):
    rq = sf.ResidualQuantizer().fit(data, 2, 8, iters=2, seed=0, progress=False)
    assert isinstance(rq.encode(data), np.ndarray)
    t = rq.encode(torch.from_numpy(data))
    assert isinstance(t, torch.Tensor)
    assert isinstance(rq.decode(t), torch.Tensor)


def test_save_load_round_trip(tmp_path, data):
    rq = sf.ResidualQuantizer().fit(data, 3, 8, iters=3, seed=0, beam_width=2, progress=False)
    rq.save(tmp_path / "rq")
    back = sf.ResidualQuantizer.load(tmp_path / "rq")
    assert torch.equal(back.codebooks, rq.codebooks) and back.beam_width == 2
    assert np.array_equal(back.encode(data), rq.encode(data))
    assert not list((tmp_path / "rq").glob("*.tmp")), "atomic writes leave no temp files"


def test_load_rejects_corrupt_artifacts(tmp_path, data):
    rq = sf.ResidualQuantizer().fit(data, 2, 8, iters=2, seed=0, progress=False)
    d = rq.save(tmp_path / "rq")
    with pytest.raises(FileNotFoundError, match="quantizer directory"):
        sf.ResidualQuantizer.load(tmp_path / "missing")
    (d / "codebooks.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="checksum mismatch"):
        sf.ResidualQuantizer.load(d)
    rq.save(d)
    cfg = json.loads((d / "rq_config.json").read_text())
    cfg["codebook_size"] = 9
    (d / "rq_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"expected float32 codebooks of shape \[2, 9, 12\]"):
        sf.ResidualQuantizer.load(d)
    (d / "rq_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        sf.ResidualQuantizer.load(d)


def test_fit_rejects_bad_input(data):
    with pytest.raises(ValueError, match="at least codebook_size = 64 rows; got 10"):
        sf.ResidualQuantizer().fit(data[:10], 2, 64)
    bad = data.copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="x must be finite"):
        sf.ResidualQuantizer().fit(bad, 2, 8)
    with pytest.raises(RuntimeError, match="call fit"):
        sf.ResidualQuantizer().encode(data)


# ------------------------------------------------------------------------------ dedup_codes


def test_dedup_codes_is_stable_in_item_order():
    codes = np.array([[1, 2], [0, 0], [1, 2], [1, 2], [0, 0], [3, 3]], dtype=np.int64)
    out, max_used = sf.dedup_codes(codes)
    assert out[:, 2].tolist() == [0, 0, 1, 2, 1, 0]
    assert max_used == 2
    assert len(np.unique(out, axis=0)) == len(out)
    assert np.array_equal(out[:, :2], codes)


def test_dedup_codes_limits_and_kinds():
    codes = torch.tensor([[5], [5], [5]], dtype=torch.int32)
    out, m = sf.dedup_codes(codes, max_suffix=2)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.int32 and m == 2
    with pytest.raises(ValueError, match=r"code \[5\] is shared by 3 rows.*max_suffix is 1"):
        sf.dedup_codes(codes, max_suffix=1)
    empty, m0 = sf.dedup_codes(np.zeros((0, 3), np.int64))
    assert empty.shape == (0, 4) and m0 == -1


def test_dedup_codes_random_property():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 3, size=(500, 2))
    out, m = sf.dedup_codes(codes)
    assert len(np.unique(out, axis=0)) == 500
    assert m == np.unique(codes, axis=0, return_counts=True)[1].max() - 1
