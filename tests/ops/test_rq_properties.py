"""Properties of residual quantization that hold on every backend."""

import itertools
import threading

import numpy as np
import pytest
import torch

import sigma_fast as sf
from sigma_fast import reference
from sigma_fast.testing import clustered_vectors, core_threads

from conftest import backend_params, device_for


def _codebooks(levels, k, d, seed):
    x = clustered_vectors(2000, d, seed=seed)
    return sf.ResidualQuantizer().fit(x, levels, k, iters=4, seed=seed, progress=False).codebooks.numpy()


@pytest.fixture(scope="module")
def trained():
    x = clustered_vectors(3000, 16, seed=11)
    rq = sf.ResidualQuantizer().fit(x, 4, 16, iters=6, seed=0, progress=False)
    return x, rq.codebooks.numpy()


@pytest.mark.parametrize("backend", backend_params())
def test_error_decreases_with_levels(backend, trained):
    x, cb = trained
    x = x[:200]
    dev = device_for(backend)
    codes = sf.rq_encode(torch.from_numpy(x).to(dev), torch.from_numpy(cb).to(dev), backend=backend)
    errs = []
    for levels in range(0, cb.shape[0] + 1):
        rec = sf.rq_decode(codes, torch.from_numpy(cb).to(dev), levels=levels, backend=backend)
        errs.append(float(((rec.cpu().numpy() - x) ** 2).sum(axis=1).mean()))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errs, errs[1:])), errs


@pytest.mark.parametrize("backend", backend_params(exclude=("triton",)))
def test_beam_search_is_no_worse_than_greedy_on_average(backend, trained):
    x, cb = trained
    dev = device_for(backend)
    xt, cbt = torch.from_numpy(x[:600]).to(dev), torch.from_numpy(cb).to(dev)
    _, e1 = sf.rq_encode(xt, cbt, return_error=True, backend=backend)
    prev = float(e1.mean())
    for beam in (2, 4, 8):
        _, eb = sf.rq_encode(xt, cbt, beam_width=beam, return_error=True, backend=backend)
        assert float(eb.mean()) <= prev * (1 + 1e-6)
        prev = float(eb.mean())


@pytest.mark.parametrize("backend", backend_params(exclude=("triton",)))
def test_exhaustive_beam_finds_the_optimum(backend):
    """With B >= K^(L-1) no partial code is ever dropped: beam search is exact."""
    rng = np.random.default_rng(5)
    levels, k, d = 3, 4, 5
    cb = (rng.standard_normal((levels, k, d)) * [[[1.0]], [[0.7]], [[0.5]]]).astype(np.float32)
    x = rng.standard_normal((25, d)).astype(np.float32)
    dev = device_for(backend)
    codes, _ = sf.rq_encode(torch.from_numpy(x).to(dev), torch.from_numpy(cb).to(dev),
                            beam_width=k ** levels, return_error=True, backend=backend)
    codes = codes.cpu().numpy()
    all_codes = np.array(list(itertools.product(range(k), repeat=levels)))
    recon = reference.rq_decode(all_codes, cb).astype(np.float64)
    for i in range(len(x)):
        errs = ((recon - x[i]) ** 2).sum(axis=1)
        got = ((reference.rq_decode(codes[i : i + 1], cb)[0] - x[i]) ** 2).sum()
        assert got <= errs.min() + 1e-4 * (1 + errs.min())


@pytest.mark.parametrize("backend", backend_params())
def test_codes_invariant_to_row_order(backend, trained):
    x, cb = trained
    x = x[:300]
    perm = np.random.default_rng(2).permutation(len(x))
    dev = device_for(backend)
    c = sf.rq_encode(torch.from_numpy(x).to(dev), torch.from_numpy(cb).to(dev), backend=backend)
    cp = sf.rq_encode(torch.from_numpy(x[perm]).to(dev), torch.from_numpy(cb).to(dev), backend=backend)
    assert torch.equal(c[torch.from_numpy(perm).to(dev)], cp)


@pytest.mark.parametrize("backend", backend_params())
def test_deterministic_across_runs_and_threads(backend, trained):
    x, cb = trained
    dev = device_for(backend)
    n = 300 if backend in ("triton", "reference") else len(x)
    xt, cbt = torch.from_numpy(x[:n]).to(dev), torch.from_numpy(cb).to(dev)
    beam = 1 if backend == "triton" else 3
    first = sf.rq_encode(xt, cbt, beam_width=beam, return_error=True, backend=backend)
    if backend == "cpu":
        for threads in (1, 2, 3, 7):
            with core_threads(threads):
                again = sf.rq_encode(xt, cbt, beam_width=beam, return_error=True, backend=backend)
            assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    again = sf.rq_encode(xt, cbt, beam_width=beam, return_error=True, backend=backend)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("backend", backend_params(exclude=("reference", "triton")))
def test_concurrent_calls_from_python_threads(backend, trained):
    x, cb = trained
    dev = device_for(backend)
    xt, cbt = torch.from_numpy(x).to(dev), torch.from_numpy(cb).to(dev)
    want = sf.rq_encode(xt, cbt, beam_width=2, backend=backend)
    results, errors = [None] * 4, []

    def work(i):
        try:
            results[i] = sf.rq_encode(xt, cbt, beam_width=2, backend=backend)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(r, want) for r in results)


@pytest.mark.parametrize("backend", backend_params())
def test_empty_input(backend):
    dev = device_for(backend)
    cb = torch.zeros((2, 3, 4), device=dev)
    codes, err = sf.rq_encode(torch.zeros((0, 4), device=dev), cb, return_error=True, backend=backend)
    assert codes.shape == (0, 2) and err.shape == (0,)
    out = sf.rq_decode(codes, cb, backend=backend)
    assert out.shape == (0, 4)


@pytest.mark.parametrize("backend", backend_params())
def test_output_buffers_fully_written(backend):
    """Every output element is written (no stale memory): run twice after filling the
    allocator's free blocks with a sentinel and compare."""
    x = clustered_vectors(50, 12, seed=9)
    cb = clustered_vectors(2 * 6, 12, seed=10).reshape(2, 6, 12)
    dev = device_for(backend)
    xt, cbt = torch.from_numpy(x).to(dev), torch.from_numpy(cb).to(dev)
    first = sf.rq_encode(xt, cbt, return_error=True, backend=backend)
    junk = [torch.full((4096,), -7, dtype=torch.int64, device=dev) for _ in range(8)]
    del junk
    second = sf.rq_encode(xt, cbt, return_error=True, backend=backend)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert int(first[0].min()) >= 0 and int(first[0].max()) < 6
