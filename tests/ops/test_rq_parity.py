"""Every backend against the reference, tie-aware (see sigma_fast.testing)."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sigma_fast as sf
from sigma_fast import reference
from sigma_fast.testing import assert_rq_codes_close, clustered_vectors

from conftest import backend_params, device_for

# Triton runs on the CPU interpreter in CI: keep its shapes small.
SMALL = dict(n=st.integers(0, 24), d=st.integers(1, 24), levels=st.integers(1, 3),
             k=st.integers(1, 12))


def _data(n, d, levels, k, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    scale = (0.5 ** np.arange(levels)).astype(np.float32)[:, None, None]
    cb = (rng.standard_normal((levels, k, d)) * scale).astype(np.float32)
    return x, cb


@pytest.mark.parametrize("backend", backend_params())
@given(**SMALL, seed=st.integers(0, 2**31 - 1))
def test_greedy_encode_matches_reference(backend, n, d, levels, k, seed):
    x, cb = _data(n, d, levels, k, seed)
    dev = device_for(backend)
    codes, err = sf.rq_encode(torch.from_numpy(x).to(dev), torch.from_numpy(cb).to(dev),
                              return_error=True, backend=backend)
    assert codes.dtype == torch.int64 and codes.shape == (n, levels)
    assert codes.device.type == dev and err.shape == (n,)
    assert_rq_codes_close(x, cb, codes, err=err)


@pytest.mark.parametrize("backend", backend_params(exclude=("triton",)))
@given(**SMALL, beam=st.integers(2, 9), seed=st.integers(0, 2**31 - 1))
def test_beam_encode_matches_reference(backend, n, d, levels, k, beam, seed):
    x, cb = _data(n, d, levels, k, seed)
    dev = device_for(backend)
    codes, err = sf.rq_encode(torch.from_numpy(x).to(dev), torch.from_numpy(cb).to(dev),
                              beam_width=beam, return_error=True, backend=backend)
    assert_rq_codes_close(x, cb, codes, beam_width=beam, err=err)


@pytest.mark.parametrize("backend", backend_params())
@given(**SMALL, seed=st.integers(0, 2**31 - 1), int32=st.booleans(), data=st.data())
def test_decode_matches_reference(backend, n, d, levels, k, seed, int32, data):
    x, cb = _data(n, d, levels, k, seed)
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, k, size=(n, levels)).astype(np.int32 if int32 else np.int64)
    use = data.draw(st.integers(0, levels))
    dev = device_for(backend)
    out = sf.rq_decode(torch.from_numpy(codes).to(dev), torch.from_numpy(cb).to(dev),
                       levels=use, backend=backend)
    want = reference.rq_decode(codes, cb, levels=use)
    # Same float32 additions in the same order: equal up to FMA contraction.
    np.testing.assert_allclose(out.cpu().numpy(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params())
@given(**SMALL, seed=st.integers(0, 2**31 - 1), pad=st.integers(0, 5), data=st.data())
def test_decode_into_a_buffer_writes_only_its_rows(backend, n, d, levels, k, seed, pad, data):
    """out= on every backend: the same values as a fresh decode, written into strided rows of a
    sentinel-filled buffer whose other cells stay untouched."""
    x, cb = _data(n, d, levels, k, seed)
    codes = np.random.default_rng(seed).integers(0, k, size=(n, levels))
    use = data.draw(st.integers(0, levels))
    dev = device_for(backend)
    codes_t, cb_t = torch.from_numpy(codes).to(dev), torch.from_numpy(cb).to(dev)
    buf = torch.full((n, d + pad + 1), -123.5, device=dev)
    view = buf[:, 1:d + 1]
    got = sf.rq_decode(codes_t, cb_t, levels=use, out=view, backend=backend)
    assert got is view
    want = sf.rq_decode(codes_t, cb_t, levels=use, backend=backend)
    assert torch.equal(view, want)
    assert (buf[:, 0] == -123.5).all() and (buf[:, d + 1:] == -123.5).all()


def test_decode_into_a_large_buffer_matches_the_reference():
    """Large enough for the cpu backend's streaming stores."""
    rng = np.random.default_rng(4)
    cb = rng.standard_normal((4, 64, 256)).astype(np.float32)
    codes = rng.integers(0, 64, size=(9000, 4))
    out = np.empty((9000, 256), np.float32)
    assert sf.rq_decode(codes, cb, out=out) is out
    np.testing.assert_array_equal(out, reference.rq_decode(codes, cb))


@pytest.mark.parametrize("backend", backend_params())
def test_strided_inputs(backend):
    x_full = clustered_vectors(40, 24, seed=3)
    cb = clustered_vectors(2 * 9, 12, seed=4).reshape(2, 9, 12)
    dev = device_for(backend)
    xt = torch.from_numpy(x_full).to(dev)[::2, 4:16]  # row stride 48, offset 4
    assert not xt.is_contiguous()
    codes = sf.rq_encode(xt, torch.from_numpy(cb).to(dev), backend=backend)
    assert_rq_codes_close(xt.cpu().numpy(), cb, codes)
    col_strided = torch.from_numpy(x_full).to(dev).t()[:12, :20].t()  # last-dim stride != 1
    codes2 = sf.rq_encode(col_strided, torch.from_numpy(cb).to(dev), backend=backend)
    assert_rq_codes_close(col_strided.cpu().numpy(), cb, codes2)
    wide = torch.from_numpy(codes.cpu().numpy().repeat(2, axis=1)).to(dev)[:, ::2]
    out = sf.rq_decode(wide, torch.from_numpy(cb).to(dev), backend=backend)
    np.testing.assert_allclose(out.cpu().numpy(), reference.rq_decode(codes.cpu().numpy(), cb),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params())
def test_exact_ties_go_to_smaller_index(backend):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 5, 8)).astype(np.float32)
    cb = np.concatenate([base, base], axis=1)  # codewords j and j+5 are identical
    x = rng.standard_normal((30, 8)).astype(np.float32)
    dev = device_for(backend)
    codes = sf.rq_encode(torch.from_numpy(x).to(dev), torch.from_numpy(cb).to(dev),
                         backend=backend).cpu().numpy()
    assert (codes < 5).all(), "a duplicated codeword must resolve to the smaller index"


@pytest.mark.parametrize("backend", backend_params(exclude=("triton",)))
def test_beam_ties_go_to_lexicographically_smaller_code(backend):
    rng = np.random.default_rng(1)
    base = rng.standard_normal((2, 4, 6)).astype(np.float32)
    cb = np.concatenate([base, base], axis=1)
    x = rng.standard_normal((20, 6)).astype(np.float32)
    dev = device_for(backend)
    codes = sf.rq_encode(torch.from_numpy(x).to(dev), torch.from_numpy(cb).to(dev),
                         beam_width=5, backend=backend).cpu().numpy()
    assert (codes < 4).all()


@pytest.mark.parametrize("backend", backend_params())
def test_numpy_in_numpy_out(backend):
    if device_for(backend) != "cpu":
        pytest.skip("NumPy inputs are CPU data")
    x = clustered_vectors(10, 8, seed=5)
    cb = clustered_vectors(2 * 4, 8, seed=6).reshape(2, 4, 8)
    codes = sf.rq_encode(x, cb, backend=backend)
    assert isinstance(codes, np.ndarray) and codes.dtype == np.int64
    out = sf.rq_decode(codes, cb, backend=backend)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32


@pytest.mark.parametrize("backend", backend_params(exclude=("reference",)))
def test_larger_realistic_shape(backend):
    """A serving-like shape that crosses the kernels' tile boundaries."""
    n = 130 if backend == "triton" else 1000
    x = clustered_vectors(n, 40, seed=7)
    rq_cb = clustered_vectors(3 * 37, 40, seed=8).reshape(3, 37, 40) * np.float32(0.5)
    dev = device_for(backend)
    codes, err = sf.rq_encode(torch.from_numpy(x).to(dev), torch.from_numpy(rq_cb).to(dev),
                              return_error=True, backend=backend)
    assert_rq_codes_close(x, rq_cb, codes, err=err)


@pytest.mark.parametrize("strategy", ["direct", "cross"])
@given(**SMALL, beam=st.integers(2, 9), seed=st.integers(0, 2**31 - 1))
def test_cpu_beam_strategies_match_reference(strategy, n, d, levels, k, beam, seed):
    """Both ways the C++ beam search evaluates <r, c> (materialised residuals, or codebook
    cross tables) keep the reference semantics; auto picks one by table size."""
    if not sf.backends()["cpu"]:
        pytest.skip(sf.backends()["cpu"].reason)
    from sigma_fast._backends import load_core

    x, cb = _data(n, d, levels, k, seed)
    codes = np.empty((n, levels), np.int64)
    err = np.empty((n,), np.float32)
    load_core().rq_encode(x, cb, beam, codes, err, strategy=strategy)
    assert_rq_codes_close(x, cb, codes, beam_width=beam, err=err)
