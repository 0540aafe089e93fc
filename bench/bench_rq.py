"""Residual quantization: sigma_fast's cpu backend against faiss-cpu and plain torch.

Workload (issue: foundation): N = 100k clustered vectors, D = 256, L = 4, K = 256, beams 1/4/16.
Roofline unit: the inner products an encode must compute, 2·N·D·K·(1 + (L-1)·B) FLOPs, as a
fraction of this machine's measured sgemm rate.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import sigma_fast as sf
from sigma_fast.testing import clustered_vectors

N = int(os.environ.get("SIGMA_FAST_BENCH_N", 100_000))
D, L, K = 256, 4, 256
BEAMS = (1, 4, 16)


@pytest.fixture(scope="module")
def data():
    x = clustered_vectors(N, D, clusters=1024, noise=0.4, seed=0)
    train = x[np.random.default_rng(1).choice(N, min(N, 20_000), replace=False)]
    rq = sf.ResidualQuantizer().fit(train, L, K, iters=4, seed=0, progress=False)
    return x, rq.codebooks.numpy()


def _flops(beam):
    return 2.0 * N * D * K * (1 + (L - 1) * beam)


def _mse(x, codes, cb):
    return float(((sf.rq_decode(codes, cb).astype(np.float64) - x) ** 2).sum(axis=1).mean())


def _report(record, benchmark, machine, group, provider, beam, x, codes, cb):
    t = benchmark.stats.stats.min
    record(group, provider, vectors_per_s=N / t, mse=_mse(x, codes, cb), seconds=t,
           pct_sgemm=100.0 * _flops(beam) / t / 1e9 / machine["sgemm_gflops"])


@pytest.mark.parametrize("beam", BEAMS)
def test_rq_encode_sigma_fast(benchmark, data, machine, record, beam):
    x, cb = data
    codes = benchmark.pedantic(lambda: sf.rq_encode(x, cb, beam_width=beam, backend="cpu"),
                               rounds=3, warmup_rounds=1)
    _report(record, benchmark, machine, f"rq_encode beam={beam}", "sigma_fast[cpu]", beam, x, codes, cb)


def _faiss_codes(fr, x, levels, nbits):
    bits = np.unpackbits(fr.compute_codes(x), axis=1, bitorder="little")
    codes = np.zeros((len(x), levels), dtype=np.int64)
    for level in range(levels):
        chunk = bits[:, level * nbits:(level + 1) * nbits].astype(np.int64)
        codes[:, level] = (chunk << np.arange(nbits)).sum(axis=1)
    return codes


@pytest.mark.parametrize("beam", BEAMS)
def test_rq_encode_faiss(benchmark, data, machine, record, beam):
    faiss = pytest.importorskip("faiss")
    x, cb = data
    fr = faiss.ResidualQuantizer(D, L, 8)
    faiss.copy_array_to_vector(cb.ravel(), fr.codebooks)
    fr.is_trained = True
    fr.max_beam_size = beam
    fr.compute_codebook_tables()
    packed = benchmark.pedantic(lambda: fr.compute_codes(x), rounds=3, warmup_rounds=1)
    del packed
    codes = _faiss_codes(fr, x, L, 8)
    _report(record, benchmark, machine, f"rq_encode beam={beam}", "faiss", beam, x, codes, cb)


def _torch_greedy(x, cb):
    r = x.clone()
    codes = torch.empty((x.shape[0], cb.shape[0]), dtype=torch.int64, device=x.device)
    norms = (cb * cb).sum(-1)
    for level in range(cb.shape[0]):
        dist = norms[level][None, :] - 2.0 * (r @ cb[level].T)
        c = dist.argmin(dim=1)
        codes[:, level] = c
        r -= cb[level][c]
    return codes


def test_rq_encode_torch_greedy(benchmark, data, machine, record):
    x, cb = data
    xt, cbt = torch.from_numpy(x), torch.from_numpy(cb)
    codes = benchmark.pedantic(lambda: _torch_greedy(xt, cbt), rounds=3, warmup_rounds=1)
    _report(record, benchmark, machine, "rq_encode beam=1", "torch (matmul+argmin)", 1, x,
            codes.numpy(), cb)


@pytest.mark.parametrize("provider", ["sigma_fast[cpu]", "sigma_fast[cpu] out= (touched buffer)",
                                      "torch (gather+sum)", "torch (gather+sum, out=)"])
def test_rq_decode(benchmark, data, machine, record, provider):
    """Decoding into a fresh output pays its first-touch page faults inside the op; ``out=``
    writes into a buffer that was already touched (a serving loop reuses one)."""
    x, cb = data
    codes = sf.rq_encode(x, cb)
    buf = np.ones((N, D), np.float32)  # touched
    if provider.startswith("torch"):
        ct, cbt = torch.from_numpy(codes), torch.from_numpy(cb)
        levels = torch.arange(L)
        if "out=" in provider:
            out_t = torch.from_numpy(buf)
            fn = lambda: torch.sum(cbt[levels[None, :], ct], 1, out=out_t)  # noqa: E731
        else:
            fn = lambda: cbt[levels[None, :], ct].sum(1)  # noqa: E731
    elif "out=" in provider:
        fn = lambda: sf.rq_decode(codes, cb, out=buf, backend="cpu")  # noqa: E731
    else:
        fn = lambda: sf.rq_decode(codes, cb, backend="cpu")  # noqa: E731
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
    t = benchmark.stats.stats.min
    written = N * D * 4
    record("rq_decode", provider, vectors_per_s=N / t, seconds=t, gb_per_s=written / t / 1e9,
           pct_mem_bw=100.0 * written / t / 1e9 / machine["mem_gbs"])


# ------------------------------------------------------------------------------ GPU providers

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _cuda_timed(benchmark, fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return benchmark.pedantic(run, rounds=5, warmup_rounds=2)


def _torch_beam(x, cb, beam, chunk=65536):
    """Beam-search RQ encode as a plain torch chain (the baseline for beam > 1): per level, the
    squared distance of every beam's residual to every codeword (one batched matmul), the top B
    of the B x K candidates by partial error, and the surviving residuals; rows in chunks."""
    levels, k, _ = cb.shape
    cnorm = (cb * cb).sum(-1)                                          # [L, K]
    out = []
    for s in range(0, x.shape[0], chunk):
        r = x[s:s + chunk, None, :]                                    # [n, 1, D]
        err = torch.zeros(r.shape[:2], device=x.device)                # [n, 1]
        codes = torch.empty((r.shape[0], 1, 0), dtype=torch.int64, device=x.device)
        for lv in range(levels):
            d2 = (r * r).sum(-1, keepdim=True) - 2 * r @ cb[lv].T + cnorm[lv]   # [n, b, K]
            cand = d2.reshape(r.shape[0], -1)
            best, idx = torch.topk(cand, min(beam, cand.shape[1]), dim=1, largest=False,
                                   sorted=True)
            parent, code = idx // k, idx % k
            r = torch.gather(r, 1, parent[..., None].expand(-1, -1, r.shape[2])) - cb[lv][code]
            codes = torch.cat([torch.gather(codes, 1, parent[..., None].expand(-1, -1, lv)),
                               code[..., None]], 2)
            err = best
        out.append(codes[:, 0])
    return torch.cat(out)


@needs_cuda
@pytest.mark.parametrize("beam", BEAMS)
@pytest.mark.parametrize("provider", ["cuda", "triton", "torch"])
def test_rq_encode_gpu(benchmark, data, machine, record, beam, provider):
    if provider == "triton" and beam != 1:
        pytest.skip(f"{provider} encodes greedily only")
    if provider != "torch" and not sf.backends()[provider]:
        pytest.skip(f"{provider}: {sf.backends()[provider].reason}")
    x, cb = data
    xt, cbt = torch.from_numpy(x).cuda(), torch.from_numpy(cb).cuda()
    if provider == "torch" and beam == 1:
        codes = _cuda_timed(benchmark, lambda: _torch_greedy(xt, cbt))
        name = "torch[cuda] (matmul+argmin)"
    elif provider == "torch":
        codes = _cuda_timed(benchmark, lambda: _torch_beam(xt, cbt, beam))
        name = "torch[cuda] (beam chain)"
    else:
        codes = _cuda_timed(benchmark, lambda: sf.rq_encode(xt, cbt, beam_width=beam, backend=provider))
        name = f"sigma_fast[{provider}]"
    t = benchmark.stats.stats.min
    props = torch.cuda.get_device_properties(0)
    record(f"rq_encode gpu beam={beam} ({props.name})", name, vectors_per_s=N / t, seconds=t,
           mse=_mse(x, codes.cpu().numpy(), cb), tflops=_flops(beam) / t / 1e12)
