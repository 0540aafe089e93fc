"""Adaptive probabilistic fusion: sigma_fast's cpu apf_fuse against the same computation as a
chain of plain torch ops.

Workload (issue 4): N = 1M items in 4096 buckets with Zipf-like sizes (weight 1/(rank + 50),
about 5% of buckets empty, so the largest holds ~4.5k items and the smallest ~50), D = 128,
K = 10 beams per request on distinct buckets drawn in proportion to bucket size (popular
prefixes are searched more, as a beam search does), M = 100, N = 20, B in {1, 16, 64}.

Baselines, measured in the same run on the same normalised bucket-contiguous rows:
  torch (gather+bmm): per request, gather its K buckets' rows padded to the largest, one bmm
      for the similarities, masked top-M, log_softmax, add φ, top-N;
  torch (slice+mv): per beam, a matrix-vector product on the bucket's slice (no copy), top-M,
      then the same fusion.
Roofline unit: embedding bytes a scan must read, Σ over beams of bucket size·D·4 ("logical";
sigma_fast reads a bucket once for all the beams of the batch that search it, so it can exceed
the machine's measured copy bandwidth), against the machine's measured memory bandwidth.
Sizes: SIGMA_FAST_BENCH_APF_N items (default 1_000_000).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sigma_fast as sf

N_ITEMS = int(os.environ.get("SIGMA_FAST_BENCH_APF_N", 1_000_000))
U, D, K, M, TOP_N, TAU, SIGMA_MIN = 4096, 128, 10, 100, 20, 0.05, 1e-3
BATCHES = (1, 16, 64)
PROVIDERS = ("sigma_fast[cpu]", "torch (gather+bmm)", "torch (slice+mv)")


@pytest.fixture(scope="module")
def catalog():
    return build_catalog()


def build_catalog():
    """(index, bucket centres, bucket sizes) of the synthetic catalog; built once per module."""
    rng = np.random.default_rng(0)
    weight = 1.0 / (np.arange(U) + 50.0)
    weight[rng.random(U) < 0.05] = 0.0  # empty buckets, as real catalogs have
    weight = weight[rng.permutation(U)]
    sizes = np.floor(weight / weight.sum() * N_ITEMS).astype(np.int64)
    sizes[np.argmax(sizes)] += N_ITEMS - sizes.sum()
    codes = np.repeat(np.arange(U), sizes)[rng.permutation(N_ITEMS)]
    centres = rng.standard_normal((U, D), dtype=np.float32)
    emb = rng.standard_normal((N_ITEMS, D), dtype=np.float32)
    emb *= 0.8
    for i in range(0, N_ITEMS, 1 << 16):  # items cluster around their bucket's centre
        emb[i:i + (1 << 16)] += centres[codes[i:i + (1 << 16)]]
    index = sf.ItemIndex(emb, codes, num_buckets=U)
    del emb
    return index, centres, sizes


def _requests(catalog, batch, seed=1):
    index, centres, sizes = catalog
    rng = np.random.default_rng(seed + batch)
    p = sizes / sizes.sum()
    pids = np.stack([rng.choice(U, size=K, replace=False, p=p) for _ in range(batch)])
    logits = rng.standard_normal((batch, K)) * 1.5
    phi = np.sort(logits - np.log(np.exp(logits).sum(1, keepdims=True)), axis=1)[:, ::-1]
    q = centres[pids] + 0.8 * rng.standard_normal((batch, K, D), dtype=np.float32)
    return (torch.from_numpy(np.ascontiguousarray(phi, dtype=np.float32)),
            torch.from_numpy(pids), torch.from_numpy(q.astype(np.float32)))


def _fuse_tail(phi_b, t_b, top_s, top_rows, valid, item_ids):
    """Shared end of the torch chains: softmax over each beam's M, add φ, global top-N."""
    top_s = top_s.masked_fill(~valid, float("-inf"))
    logp = phi_b[:, None] + torch.log_softmax(t_b * top_s, dim=1)
    n = min(TOP_N, logp.numel())
    lp, flat = logp.reshape(-1).topk(n)
    keep = lp > float("-inf")
    return item_ids[top_rows.reshape(-1)[flat]][keep], lp[keep], (flat // top_s.shape[1])[keep]


def torch_gather_bmm(phi, pids, q, index):
    emb, offsets, item_ids = index.embeddings, index.offsets, index.item_ids
    qn = F.normalize(q, dim=-1)
    t = phi.std(dim=1, unbiased=False).clamp_min(SIGMA_MIN) / TAU
    out = []
    for b in range(phi.shape[0]):
        start = offsets[pids[b]]
        size = offsets[pids[b] + 1] - start
        width = int(size.max())
        col = torch.arange(width, device=emb.device)
        valid = col[None, :] < size[:, None]
        rows = torch.where(valid, start[:, None] + col, 0)  # [K, L]
        block = emb[rows.reshape(-1)].view(K, width, D)  # gather bucket rows
        sims = torch.bmm(block, qn[b][:, :, None]).squeeze(-1).masked_fill(~valid, float("-inf"))
        top_s, top_i = sims.topk(min(M, width), dim=1)
        out.append(_fuse_tail(phi[b], t[b], top_s, torch.gather(rows, 1, top_i),
                              top_s > float("-inf"), item_ids))
    return out


def torch_slice_mv(phi, pids, q, index):
    emb, offsets, item_ids = index.embeddings, index.offsets, index.item_ids
    qn = F.normalize(q, dim=-1)
    t = phi.std(dim=1, unbiased=False).clamp_min(SIGMA_MIN) / TAU
    off = offsets.tolist()
    out = []
    for b in range(phi.shape[0]):
        top_s = torch.full((K, M), float("-inf"))
        top_rows = torch.zeros((K, M), dtype=torch.int64)
        for k in range(K):
            lo, hi = off[pids[b, k]], off[pids[b, k] + 1]
            s, i = torch.mv(emb[lo:hi], qn[b, k]).topk(min(M, hi - lo))
            top_s[k, :len(s)] = s
            top_rows[k, :len(s)] = i + lo
        out.append(_fuse_tail(phi[b], t[b], top_s, top_rows, top_s > float("-inf"), item_ids))
    return out


def _sigma_fast(phi, pids, q, index):
    return sf.apf_fuse(phi, pids, q, index, top_m=M, top_n=TOP_N, tau=TAU, sigma_min=SIGMA_MIN,
                       backend="cpu")


def _agreement(ours, theirs):
    """Share of requests whose top-N item sets agree (float32 rounding may swap near-ties)."""
    same = sum(set(ours[0][b].tolist()) == set(ids.tolist()) for b, (ids, _, _) in
               enumerate(theirs))
    return same / len(theirs)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_apf_fuse(benchmark, catalog, machine, record, provider, batch):
    index = catalog[0]
    phi, pids, q = _requests(catalog, batch)
    fn = {"sigma_fast[cpu]": _sigma_fast, "torch (gather+bmm)": torch_gather_bmm,
          "torch (slice+mv)": torch_slice_mv}[provider]
    result = benchmark.pedantic(lambda: fn(phi, pids, q, index), rounds=5 if batch < 64 else 3,
                                warmup_rounds=1)
    sizes = (index.offsets[pids + 1] - index.offsets[pids]).numpy()
    logical = float(sizes.sum()) * D * 4
    distinct = torch.unique(pids)
    unique = float((index.offsets[distinct + 1] - index.offsets[distinct]).sum()) * D * 4
    t = benchmark.stats.stats.min
    figures = dict(requests_per_s=batch / t, ms=1e3 * t, gb_per_s=logical / t / 1e9,
                   pct_mem_bw=100.0 * logical / t / 1e9 / machine["mem_gbs"],
                   unique_gb_per_s=unique / t / 1e9)
    if provider != "sigma_fast[cpu]":
        figures["agree"] = _agreement(_sigma_fast(phi, pids, q, index), result)
        assert figures["agree"] >= 0.9, f"{provider} disagrees with sigma_fast: {figures['agree']}"
    record(f"apf_fuse B={batch} (K={K}, M={M}, N={TOP_N}, {N_ITEMS} items)", provider, **figures)


# ------------------------------------------------------------------------------ GPU providers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("provider", ["cuda", "triton", "torch"])
def test_apf_fuse_gpu(benchmark, catalog, record, provider, batch):
    """apf_fuse on the GPU; roofline unit: bytes the scan must read per second (compare with the
    card's HBM bandwidth)."""
    if provider != "torch" and not sf.backends()[provider]:
        pytest.skip(f"{provider}: {sf.backends()[provider].reason}")
    dev = torch.device("cuda")
    index = catalog[0].to(dev)
    phi, pids, q = (t.to(dev) for t in _requests(catalog, batch))
    if provider == "torch":
        fn = lambda: torch_gather_bmm(phi, pids, q, index)  # noqa: E731
        name = "torch[cuda] (gather+bmm)"
    else:
        fn = lambda: sf.apf_fuse(phi, pids, q, index, top_m=M, top_n=TOP_N, tau=TAU,  # noqa: E731
                                 sigma_min=SIGMA_MIN, backend=provider)
        name = f"sigma_fast[{provider}]"

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    benchmark.pedantic(run, rounds=10, warmup_rounds=2)
    off = catalog[0].offsets
    pc = pids.cpu()
    logical = float((off[pc + 1] - off[pc]).sum()) * D * 4
    t = benchmark.stats.stats.min
    props = torch.cuda.get_device_properties(0)
    record(f"apf_fuse gpu B={batch} ({props.name})", name, requests_per_s=batch / t, ms=1e3 * t,
           gb_per_s=logical / t / 1e9)
