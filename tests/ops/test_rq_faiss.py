"""External parity: faiss-cpu's ResidualQuantizer with the same codebooks."""

import numpy as np
import pytest

import sigma_fast as sf
from sigma_fast.testing import clustered_vectors, rq_tolerance

faiss = pytest.importorskip("faiss", reason="faiss-cpu is not installed")


def _faiss_rq(codebooks: np.ndarray, beam: int):
    levels, k, d = codebooks.shape
    nbits = int(np.log2(k))
    assert 2**nbits == k
    fr = faiss.ResidualQuantizer(d, levels, nbits)
    faiss.copy_array_to_vector(np.ascontiguousarray(codebooks).ravel(), fr.codebooks)
    fr.is_trained = True
    fr.max_beam_size = beam
    fr.compute_codebook_tables()
    return fr


def _faiss_encode(fr, x):
    packed = fr.compute_codes(x)
    levels, nbits = fr.M, int(faiss.vector_to_array(fr.nbits)[0])
    k = 2**nbits
    # faiss packs codes little-endian, nbits per level
    bits = np.unpackbits(packed, axis=1, bitorder="little")
    codes = np.zeros((len(x), levels), dtype=np.int64)
    for level in range(levels):
        chunk = bits[:, level * nbits : (level + 1) * nbits].astype(np.int64)
        codes[:, level] = (chunk << np.arange(nbits)).sum(axis=1)
    assert codes.max() < k
    return codes


@pytest.fixture(scope="module")
def setup():
    x = clustered_vectors(4000, 32, clusters=50, seed=31)
    rq = sf.ResidualQuantizer().fit(x, 3, 32, iters=6, seed=0, progress=False)
    return x, rq.codebooks.numpy()


def test_greedy_matches_faiss_beam_1(setup):
    x, cb = setup
    ours = sf.rq_encode(x, cb)
    theirs = _faiss_encode(_faiss_rq(cb, 1), x)
    same = (ours == theirs).all(axis=1)
    # Rows may differ only on float32 near-ties: their errors must agree to rounding.
    err = lambda c: ((sf.rq_decode(c, cb).astype(np.float64) - x) ** 2).sum(axis=1)  # noqa: E731
    tol = rq_tolerance(x, cb)
    assert np.all(np.abs(err(ours) - err(theirs))[~same] <= tol[~same])
    assert same.mean() > 0.99


@pytest.mark.parametrize("beam", [2, 4, 8])
def test_beam_no_worse_than_faiss(setup, beam):
    x, cb = setup
    _, ours_err = sf.rq_encode(x, cb, beam_width=beam, return_error=True)
    theirs = _faiss_encode(_faiss_rq(cb, beam), x)
    theirs_err = ((sf.rq_decode(theirs, cb).astype(np.float64) - x) ** 2).sum(axis=1)
    assert ours_err.astype(np.float64).mean() <= theirs_err.mean() * (1 + 1e-5)
    # Same algorithm: per row the errors agree except on near-ties.
    agree = np.abs(ours_err - theirs_err) <= rq_tolerance(x, cb)
    assert agree.mean() > 0.99
