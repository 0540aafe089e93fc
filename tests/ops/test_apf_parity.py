"""apf_fuse: every backend against the reference (tie-aware, see sigma_fast.testing), a
brute-force scoring of every candidate, and the edge cases of the contract."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sigma_fast as sf
from sigma_fast import reference
from sigma_fast.reference.apf import l2_normalize
from sigma_fast.testing import assert_apf_close, core_threads

from conftest import backend_params, device_for


def apf_backends(exclude=()):
    """Every backend (unavailable ones skipped with the reason by backend_params)."""
    return backend_params(exclude)


def make_case(seed, *, n_items=60, dim=12, num_buckets=6, batch=3, beams=4, empty=1,
              ninf_frac=0.2, dup_frac=0.0, id_mode="arange", mask=None, mask_drop=0.3):
    """A random catalog (items clustered per bucket, so in-bucket similarities spread) and a
    batch of beams. ``mask``: None, "shared", "per_request" or "drop_bucket" (per request,
    removes every item of one bucket that a beam searches)."""
    rng = np.random.default_rng(seed)
    filled = np.arange(num_buckets - empty) if num_buckets > empty else np.arange(num_buckets)
    codes = rng.choice(filled, size=n_items)
    centres = rng.standard_normal((num_buckets, dim)).astype(np.float32)
    emb = (centres[codes] + 0.7 * rng.standard_normal((n_items, dim))).astype(np.float32)
    if id_mode == "arange":
        ids = None
        id_bound = n_items
    elif id_mode == "perm":
        ids = rng.permutation(n_items)
        id_bound = n_items
    else:  # sparse: unique ids with gaps
        ids = np.sort(rng.choice(3 * n_items, size=n_items, replace=False))[rng.permutation(n_items)]
        id_bound = int(ids.max()) + 1
    index = sf.ItemIndex(emb, codes, item_ids=ids, num_buckets=num_buckets)
    phi = (rng.standard_normal((batch, beams)) * rng.uniform(0.1, 3.0) - 2.0).astype(np.float32)
    phi[rng.random((batch, beams)) < ninf_frac] = -np.inf
    pids = rng.integers(0, num_buckets, size=(batch, beams))
    if dup_frac and beams > 1:
        dup = rng.random((batch, beams)) < dup_frac
        dup[:, 0] = False
        pids = np.where(dup, pids[:, :1], pids)
    pids[np.isinf(phi) & (rng.random((batch, beams)) < 0.5)] = -1  # padding beams may say -1
    q = rng.standard_normal((batch, beams, dim)).astype(np.float32)
    allowed = None
    if mask == "shared":
        allowed = rng.random(id_bound) > mask_drop
    elif mask == "per_request":
        allowed = rng.random((batch, id_bound)) > mask_drop
    elif mask == "drop_bucket":
        allowed = np.ones((batch, id_bound), dtype=bool)
        all_ids = index.item_ids.numpy()
        off = index.offsets.numpy()
        for b in range(batch):
            u = pids[b, 0] if beams and pids[b, 0] >= 0 else 0
            allowed[b, all_ids[off[u]:off[u + 1]]] = False
    return index, phi, pids, q, allowed


def run(backend, index, phi, pids, q, **kw):
    dev = device_for(backend)
    t = lambda a: None if a is None else torch.from_numpy(np.asarray(a)).to(dev)  # noqa: E731
    allowed = kw.pop("allowed", None)
    out = sf.apf_fuse(t(phi), t(pids), t(q), index.to(dev), allowed=t(allowed), backend=backend,
                      **kw)
    for o in out:
        assert o.device.type == dev
    return tuple(o.cpu().numpy() for o in out)


def brute_force(index, phi, pids, q, *, top_m, top_n, tau, adaptive=True, sigma_min=1e-3,
                allowed=None, normalize="top_m", dedup=True):
    """Score every (beam, item) pair of the catalog at once, then apply the formula."""
    emb = index.embeddings.numpy().astype(np.float64)
    ids = index.item_ids.numpy()
    off = index.offsets.numpy()
    bucket = np.repeat(np.arange(len(off) - 1), np.diff(off))
    batch, beams = phi.shape
    sims = l2_normalize(q).astype(np.float64) @ emb.T  # [B, K, N]
    mask = np.ones((batch, len(ids)), bool) if allowed is None else np.broadcast_to(
        np.asarray(allowed)[..., ids], (batch, len(ids)))
    out = (np.full((batch, top_n), -1), np.full((batch, top_n), -np.inf, np.float32),
           np.full((batch, top_n), -1))
    for b in range(batch):
        fin = np.isfinite(phi[b])
        if not fin.any():
            continue
        t = (max(np.std(phi[b, fin].astype(np.float64)), sigma_min) if adaptive else 1.0) / tau
        rows = []  # (log P, id, k)
        for k in np.nonzero(fin)[0]:
            elig = np.nonzero((bucket == pids[b, k]) & mask[b])[0]
            if not len(elig):
                continue
            s = sims[b, k, elig]
            keep = elig[np.lexsort((ids[elig], -s))][:top_m]
            pool = sims[b, k, keep if normalize == "top_m" else elig] * t
            lse = pool.max() + np.log(np.exp(pool - pool.max()).sum())
            rows += [(phi[b, k] + t * sims[b, k, r] - lse, ids[r], k) for r in keep]
        rows.sort(key=lambda r: (-r[0], r[1], r[2]))
        if dedup:
            rows = [r for i, r in enumerate(rows) if r[1] not in {x[1] for x in rows[:i]}]
        for n, (lp, item, k) in enumerate(rows[:top_n]):
            out[0][b, n], out[1][b, n], out[2][b, n] = item, lp, k
    return out


CASES = dict(
    seed=st.integers(0, 2**31 - 1),
    n_items=st.integers(1, 50),
    dim=st.integers(1, 20),
    num_buckets=st.integers(1, 7),
    empty=st.integers(0, 2),
    batch=st.integers(0, 4),
    beams=st.integers(0, 5),
    dup_frac=st.sampled_from([0.0, 0.5]),
    id_mode=st.sampled_from(["arange", "perm", "sparse"]),
    mask=st.sampled_from([None, "shared", "per_request", "drop_bucket"]),
)
PARAMS = dict(
    top_m=st.integers(1, 9),
    top_n=st.integers(1, 14),
    tau=st.sampled_from([0.05, 0.3, 1.0]),
    adaptive=st.booleans(),
    sigma_min=st.sampled_from([1e-3, 1e-8, 0.5]),  # t_b >= 2^-28 even when beams tie
    normalize=st.sampled_from(["top_m", "bucket"]),
    dedup=st.booleans(),
)


@pytest.mark.parametrize("backend", apf_backends())
@given(case=st.fixed_dictionaries(CASES), params=st.fixed_dictionaries(PARAMS))
def test_matches_reference(backend, case, params):
    index, phi, pids, q, allowed = make_case(**case)
    got = run(backend, index, phi, pids, q, allowed=allowed, return_buckets=True, **params)
    want = reference.apf_fuse(phi, pids, q, index, allowed=allowed, return_buckets=True, **params)
    b, k = phi.shape
    for g, shape, dtype in zip(got, [(b, params["top_n"])] * 3 + [(b, k, params["top_m"])] * 2,
                               [np.int64, np.float32, np.int64, np.int64, np.float32]):
        assert g.shape == shape and g.dtype == dtype
    assert_apf_close(got, want, phi, index.dim, tau=params["tau"], adaptive=params["adaptive"],
                     sigma_min=params["sigma_min"])
    if allowed is not None:  # an item outside the mask is never returned
        m = np.broadcast_to(allowed, (b, allowed.shape[-1]))
        for row in range(b):
            ids = got[0][row][got[0][row] >= 0]
            assert m[row, ids].all()


@pytest.mark.parametrize("backend", apf_backends())
@given(case=st.fixed_dictionaries(CASES), params=st.fixed_dictionaries(PARAMS))
def test_matches_brute_force(backend, case, params):
    index, phi, pids, q, allowed = make_case(**case)
    got = run(backend, index, phi, pids, q, allowed=allowed, **params)
    want = brute_force(index, phi, pids, q, allowed=allowed, **params)
    assert_apf_close(got, want, phi, index.dim, tau=params["tau"], adaptive=params["adaptive"],
                     sigma_min=params["sigma_min"])


@pytest.mark.parametrize("backend", apf_backends(exclude=("reference", "cpu")))
@pytest.mark.parametrize("scan_rows", [1, 4])
@settings(max_examples=8)
@given(case=st.fixed_dictionaries(CASES), params=st.fixed_dictionaries(PARAMS))
def test_multi_tile_scan_matches_reference(backend, scan_rows, case, params):
    # The Triton scan merges its running top-M with each tile of rows; tiny tiles make the
    # small test buckets span many tiles (the cuda kernel's tiles are fixed at 256 rows:
    # test_long_buckets_and_large_top_m covers its merge).
    tri = None
    if backend == "triton":
        import sigma_fast.triton.apf as tri
        before, tri.SCAN_ROWS = tri.SCAN_ROWS, scan_rows
    try:
        index, phi, pids, q, allowed = make_case(**case)
        got = run(backend, index, phi, pids, q, allowed=allowed, return_buckets=True, **params)
    finally:
        if tri is not None:
            tri.SCAN_ROWS = before
    want = reference.apf_fuse(phi, pids, q, index, allowed=allowed, return_buckets=True,
                              **params)
    assert_apf_close(got, want, phi, index.dim, tau=params["tau"], adaptive=params["adaptive"],
                     sigma_min=params["sigma_min"])


KW = dict(top_m=4, top_n=10, tau=0.1)


def check(backend, index, phi, pids, q, **kw):
    kw = {**KW, **kw}
    got = run(backend, index, phi, pids, q, return_buckets=True, **kw)
    want = reference.apf_fuse(phi, pids, q, index, return_buckets=True, **kw)
    assert_apf_close(got, want, phi, index.dim, tau=kw["tau"], adaptive=kw.get("adaptive", True),
                     sigma_min=kw.get("sigma_min", 1e-3))
    brute = brute_force(index, phi, pids, q, **{k: v for k, v in kw.items()})
    assert_apf_close(got[:3], brute, phi, index.dim, tau=kw["tau"],
                     adaptive=kw.get("adaptive", True), sigma_min=kw.get("sigma_min", 1e-3))
    return got


@pytest.mark.parametrize("backend", apf_backends())
def test_non_adaptive_temperature_is_one_over_tau(backend):
    index, phi, pids, q, _ = make_case(1, ninf_frac=0.0, empty=0)
    got = check(backend, index, phi, pids, q, adaptive=False, tau=0.25)
    # log P - φ_k + lse = s / τ: differences of log P within one beam are differences of s / τ.
    ids, logp, src, b_ids, b_sims = got
    for b in range(phi.shape[0]):
        k = src[b, 0]
        same = np.nonzero(src[b] == k)[0]
        if len(same) > 1:
            i, j = same[:2]
            si = b_sims[b, k][b_ids[b, k] == ids[b, i]][0]
            sj = b_sims[b, k][b_ids[b, k] == ids[b, j]][0]
            assert abs((logp[b, i] - logp[b, j]) - (si - sj) / 0.25) < 1e-4


@pytest.mark.parametrize("backend", apf_backends())
@pytest.mark.parametrize("sigma_min", [1e-3, 0.2])
def test_single_beam_and_equal_scores_use_sigma_min(backend, sigma_min):
    index, _, _, q, _ = make_case(2, batch=2, beams=3, empty=0)
    pids = np.array([[0, 1, 2], [3, 4, 5]])
    one = np.array([[-1.5, -np.inf, -np.inf], [-0.7, -np.inf, -np.inf]], np.float32)  # K = 1
    equal = np.full((2, 3), -1.2, np.float32)  # σ = 0
    for phi in (one, equal):
        ids, logp, src, b_ids, b_sims = check(backend, index, phi, pids, q, sigma_min=sigma_min)
        t = sigma_min / KW["tau"]
        b, k = 0, src[0, 0]
        s = b_sims[b, k][b_ids[b, k] >= 0].astype(np.float64)
        want = phi[b, k] + t * s[0] - (t * s).max() - np.log(np.exp(t * s - (t * s).max()).sum())
        assert abs(logp[0, 0] - want) < 1e-5


@pytest.mark.parametrize("backend", apf_backends())
def test_small_empty_buckets_and_padding(backend):
    # Buckets of 1-3 items (< M), an empty bucket, -inf beams, N > K·M.
    rng = np.random.default_rng(3)
    codes = np.array([0, 0, 1, 2, 2, 2])
    emb = rng.standard_normal((6, 5)).astype(np.float32)
    index = sf.ItemIndex(emb, codes, num_buckets=4)  # bucket 3 is empty
    phi = np.array([[-1.0, -2.0, -np.inf, -0.5], [-np.inf] * 4, [-3.0, -1.0, -2.0, -4.0]],
                   np.float32)
    pids = np.array([[0, 1, 2, 3], [-1, -1, -1, -1], [3, 3, 3, 2]])
    q = rng.standard_normal((3, 4, 5)).astype(np.float32)
    ids, logp, src, b_ids, b_sims = check(backend, index, phi, pids, q, top_m=5, top_n=20)
    assert (ids[0] >= 0).sum() == 3 and sorted(ids[0][:3]) == [0, 1, 2]  # beams 0, 1; not 2
    assert (ids[1] == -1).all() and (logp[1] == -np.inf).all() and (src[1] == -1).all()
    assert (ids[2] >= 0).sum() == 3 and set(src[2][:3]) == {3}
    assert (b_ids[0, 0] >= 0).sum() == 2 and (b_ids[0, 1] >= 0).sum() == 1
    assert (b_ids[0, 2] == -1).all() and (b_ids[0, 3] == -1).all()  # -inf beam, empty bucket
    assert (b_sims[0, 3] == -np.inf).all()
    # The probabilities of one bucket's candidates sum to exp(φ) (softmax over its M).
    for k in (0, 1):
        assert abs(np.exp(logp[0][src[0] == k].astype(np.float64)).sum() - np.exp(phi[0, k])) < 1e-5


@pytest.mark.parametrize("backend", apf_backends())
def test_mask_removing_whole_buckets(backend):
    index, phi, pids, q, allowed = make_case(4, mask="drop_bucket", ninf_frac=0.0, empty=0)
    ids, logp, src, b_ids, _ = check(backend, index, phi, pids, q, allowed=allowed)
    for b in range(phi.shape[0]):
        assert (b_ids[b, 0] == -1).all()  # the masked bucket's beam found nothing
        same = pids[b] == pids[b, 0]
        assert not np.isin(src[b], np.nonzero(same)[0]).any()
        assert allowed[b, ids[b][ids[b] >= 0]].all()
    # Everything masked: all padding, not an error.
    out = run(backend, index, phi, pids, q, allowed=np.zeros(index.id_bound, bool), **KW)
    assert (out[0] == -1).all() and (out[1] == -np.inf).all()


@pytest.mark.parametrize("backend", apf_backends())
def test_dedup(backend):
    index, phi, pids, q, _ = make_case(5, ninf_frac=0.0, empty=0, num_buckets=3)
    pids[:] = 1  # every beam searches the same bucket: every item is reachable from all beams
    q = (q[:, :1] + 0.05 * q).astype(np.float32)  # similar queries, so the beams' top M overlap
    kw = dict(top_m=6, top_n=30)
    on = check(backend, index, phi, pids, q, dedup=True, **kw)
    off = check(backend, index, phi, pids, q, dedup=False, **kw)
    size = int(index.bucket_sizes()[1])
    for b in range(phi.shape[0]):
        union = set(on[3][b][on[3][b] >= 0].tolist())  # every beam's top M
        got_on = on[0][b][on[0][b] >= 0]
        assert len(got_on) == len(set(got_on)) and set(got_on.tolist()) == union
        got_off = off[0][b][off[0][b] >= 0]
        assert len(got_off) == min(30, phi.shape[1] * min(6, size))
        assert len(set(got_off)) < len(got_off)
        # dedup keeps each item's best log P: the first occurrence in the un-deduplicated list.
        first = {}
        for i, lp in zip(got_off, off[1][b]):
            first.setdefault(i, lp)
        for i, lp in zip(got_on, on[1][b]):
            if i in first:
                assert lp == first[i]


@pytest.mark.parametrize("backend", apf_backends())
def test_normalize_bucket(backend):
    index, phi, pids, q, allowed = make_case(6, n_items=200, num_buckets=4, mask="per_request")
    ids, logp, src, _, _ = check(backend, index, phi, pids, q, normalize="bucket", top_m=3,
                                 allowed=allowed)
    top = run(backend, index, phi, pids, q, normalize="top_m", top_m=3, allowed=allowed, **{
        k: v for k, v in KW.items() if k != "top_m"})
    # Normalising over more items lowers every log P (same ordering within a beam).
    valid = ids >= 0
    assert (logp[valid] <= top[1][valid] + 1e-5).all()


@pytest.mark.parametrize("backend", apf_backends())
def test_exact_ties_go_to_the_smaller_item_id(backend):
    rng = np.random.default_rng(7)
    base = rng.standard_normal((3, 8)).astype(np.float32)
    emb = np.repeat(base, 4, axis=0)  # four identical copies of each row
    ids = rng.permutation(100)[:12]
    index = sf.ItemIndex(emb, np.zeros(12, np.int64), item_ids=ids)
    phi = np.array([[-1.0, -1.0]], np.float32)
    pids = np.zeros((1, 2), np.int64)
    q = np.stack([base[1], base[1]])[None].astype(np.float32)
    got = run(backend, index, phi, pids, q, top_m=3, top_n=6, tau=0.1, return_buckets=True,
              dedup=False)
    copies = np.sort(ids[4:8])
    assert got[3][0, 0].tolist() == copies[:3].tolist()  # equal sims: smaller id first
    # Equal log P from the two beams: smaller id first, then the smaller beam.
    assert got[0][0].tolist() == np.repeat(copies[:3], 2).tolist()
    assert got[2][0].tolist() == [0, 1] * 3


def test_thread_count_and_batch_do_not_change_results():
    # Buckets longer than a row chunk (4096) and more than 64 beams on one bucket, so the
    # kernel splits rows and queries into several tasks.
    rng = np.random.default_rng(8)
    n, d = 9000, 8
    codes = np.where(np.arange(n) < 8500, 0, 1 + np.arange(n) % 3)
    index = sf.ItemIndex(rng.standard_normal((n, d)).astype(np.float32), codes)
    batch, beams = 30, 3
    phi = rng.standard_normal((batch, beams)).astype(np.float32)
    pids = np.where(rng.random((batch, beams)) < 0.8, 0, rng.integers(1, 4, (batch, beams)))
    q = rng.standard_normal((batch, beams, d)).astype(np.float32)
    allowed = rng.random((batch, n)) > 0.1
    kw = dict(top_m=50, top_n=40, tau=0.1, allowed=allowed, return_buckets=True)
    outs = []
    for threads in (1, 2, 3, 7):
        with core_threads(threads):
            for normalize in ("top_m", "bucket"):
                outs.append((threads, normalize, sf.apf_fuse(phi, pids, q, index, backend="cpu",
                                                             normalize=normalize, **kw)))
    for normalize in ("top_m", "bucket"):
        first = next(o for t, nm, o in outs if nm == normalize)
        for t, nm, o in outs:
            if nm == normalize:
                for a, b in zip(first, o):
                    assert np.array_equal(a, b), f"threads={t} normalize={nm}"
    # A request alone gives bitwise the same answer as inside the batch.
    alone = sf.apf_fuse(phi[5:6], pids[5:6], q[5:6], index, backend="cpu", top_m=50, top_n=40,
                        tau=0.1, allowed=allowed[5:6], return_buckets=True)
    for a, b in zip(alone, outs[0][2]):
        assert np.array_equal(a[0], b[5])
    want = reference.apf_fuse(phi, pids, q, index, **kw)
    assert_apf_close(outs[0][2], want, phi, d, tau=0.1)


@pytest.mark.parametrize("backend", apf_backends())
def test_strided_and_int32_inputs(backend):
    index, phi, pids, q, allowed = make_case(9, beams=6, mask="per_request")
    dev = device_for(backend)
    big_q = torch.zeros((3, 6, index.dim * 2))
    big_q[:, :, ::2] = torch.from_numpy(q)
    q_strided = big_q[:, :, ::2]  # last-dim stride 2
    phi_t = torch.from_numpy(np.repeat(phi, 2, axis=1))[:, ::2]
    pids_t = torch.from_numpy(pids.astype(np.int32).T.copy()).t()  # int32, transposed
    mask_t = torch.from_numpy(np.repeat(allowed, 2, axis=1))[:, ::2]
    assert not (q_strided.is_contiguous() or phi_t.is_contiguous() or pids_t.is_contiguous())
    got = sf.apf_fuse(phi_t.to(dev), pids_t.to(dev), q_strided.to(dev), index.to(dev),
                      allowed=mask_t.to(dev), backend=backend, return_buckets=True, **KW)
    want = reference.apf_fuse(phi, pids, q, index, allowed=allowed, return_buckets=True, **KW)
    assert_apf_close(tuple(g.cpu() for g in got), want, phi, index.dim, tau=KW["tau"])


def test_numpy_in_numpy_out_and_default_backend():
    index, phi, pids, q, _ = make_case(10)
    out = sf.apf_fuse(phi, pids, q, index, **KW)
    assert len(out) == 3 and all(isinstance(o, np.ndarray) for o in out)
    out_t = sf.apf_fuse(torch.from_numpy(phi), torch.from_numpy(pids), torch.from_numpy(q), index,
                        **KW)
    assert all(isinstance(o, torch.Tensor) for o in out_t)
    for a, b in zip(out, out_t):
        assert np.array_equal(a, b.numpy())


def test_results_invariant_to_catalog_row_order():
    rng = np.random.default_rng(11)
    n, d = 300, 16
    emb = rng.standard_normal((n, d)).astype(np.float32)
    codes = rng.integers(0, 5, n)
    ids = rng.permutation(1000)[:n]
    perm = rng.permutation(n)
    a = sf.ItemIndex(emb, codes, item_ids=ids)
    b = sf.ItemIndex(emb[perm], codes[perm], item_ids=ids[perm])
    phi = rng.standard_normal((4, 3)).astype(np.float32)
    pids = rng.integers(0, 5, (4, 3))
    q = rng.standard_normal((4, 3, d)).astype(np.float32)
    for backend in ("cpu", "reference"):
        out_a = sf.apf_fuse(phi, pids, q, a, backend=backend, return_buckets=True, **KW)
        out_b = sf.apf_fuse(phi, pids, q, b, backend=backend, return_buckets=True, **KW)
        for x, y in zip(out_a, out_b):
            assert np.array_equal(x, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs_run_on_the_default_backend():
    index, phi, pids, q, _ = make_case(12)
    got = sf.apf_fuse(torch.from_numpy(phi).cuda(), torch.from_numpy(pids).cuda(),
                      torch.from_numpy(q).cuda(), index.to("cuda"), **KW)
    assert all(o.device.type == "cuda" for o in got)
    want = reference.apf_fuse(phi, pids, q, index, **KW)
    assert_apf_close(tuple(o.cpu() for o in got), want, phi, index.dim, tau=KW["tau"])


@pytest.mark.parametrize("backend", backend_params(exclude=("reference", "cpu")))
def test_index_built_on_cpu_moved_and_fused_elsewhere(backend):
    # Build on the CPU, move with .to(device), fuse on another backend; compare with cpu.
    index, phi, pids, q, allowed = make_case(13, mask="per_request", dup_frac=0.5)
    dev = device_for(backend)
    moved = index.to(dev)
    assert moved.device.type == dev
    t = lambda a: torch.from_numpy(np.asarray(a)).to(dev)  # noqa: E731
    got = sf.apf_fuse(t(phi), t(pids), t(q), moved, allowed=t(allowed), backend=backend,
                      return_buckets=True, **KW)
    want = sf.apf_fuse(phi, pids, q, index, allowed=allowed, backend="cpu",
                       return_buckets=True, **KW)
    assert_apf_close(tuple(g.cpu() for g in got), want, phi, index.dim, tau=KW["tau"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_index_on_another_device_is_refused_with_a_hint():
    index, phi, pids, q, _ = make_case(13)
    with pytest.raises(ValueError, match=r"index\.to"):
        sf.apf_fuse(torch.from_numpy(phi).cuda(), torch.from_numpy(pids).cuda(),
                    torch.from_numpy(q).cuda(), index, **KW)


@pytest.mark.parametrize("backend", apf_backends(exclude=("reference",)))
def test_long_buckets_and_large_top_m(backend):
    # Buckets longer than the kernels' row tiles (cuda: 256 rows, triton: up to 64), top_m
    # beyond one tile's survivors, and normalize="bucket" accumulated over many tiles.
    rng = np.random.default_rng(14)
    n, d = (300 if backend == "triton" else 1400), 8
    codes = np.where(np.arange(n) < n - 100, 0, 1)
    index = sf.ItemIndex(rng.standard_normal((n, d)).astype(np.float32), codes)
    phi = rng.standard_normal((2, 3)).astype(np.float32)
    pids = np.array([[0, 1, 0], [0, 0, 1]])
    q = rng.standard_normal((2, 3, d)).astype(np.float32)
    allowed = rng.random((2, n)) > 0.2
    for normalize in ("top_m", "bucket"):
        kw = dict(top_m=90 if backend == "triton" else 300, top_n=50, tau=0.2,
                  normalize=normalize)
        got = run(backend, index, phi, pids, q, allowed=allowed, return_buckets=True, **kw)
        want = reference.apf_fuse(phi, pids, q, index, allowed=allowed, return_buckets=True,
                                  **kw)
        assert_apf_close(got, want, phi, d, tau=0.2)


def test_triton_default_dispatch_and_top_m_limit():
    # Forced triton with top_m beyond its kernel says so; the error names the alternatives.
    if not sf.backends()["triton"]:
        pytest.skip(f"triton unavailable: {sf.backends()['triton'].reason}")
    from sigma_fast.triton.apf import MAX_TOP_M

    index, phi, pids, q, _ = make_case(15)
    dev = device_for("triton")
    t = lambda a: torch.from_numpy(np.asarray(a)).to(dev)  # noqa: E731
    with pytest.raises(NotImplementedError, match="top_m"):
        sf.apf_fuse(t(phi), t(pids), t(q), index.to(dev), backend="triton", top_m=MAX_TOP_M + 1,
                    top_n=5, tau=0.1)


def test_half_precision_index_is_cuda_only():
    index, *_ = make_case(13)
    with pytest.raises(ValueError, match="for CUDA devices; got cpu"):
        index.to("cpu", dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
        index.to("cpu", dtype=torch.float64)
    assert index.to("cpu", dtype=torch.float32) is index


@pytest.mark.gpu
@pytest.mark.skipif(not sf.backends()["cuda"], reason="needs the cuda backend (a CUDA device)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_index_on_cuda(dtype):
    """bf16/fp16 embeddings: the cuda scan accumulates in float32; results agree with the
    float32 index up to the storage rounding (compared through the top-N log-probabilities)."""
    index, phi, pids, q, _ = make_case(13)
    half = index.to("cuda", dtype=dtype)
    assert half.embeddings.dtype == dtype
    t = lambda a: torch.from_numpy(np.asarray(a)).cuda()  # noqa: E731
    got = sf.apf_fuse(t(phi), t(pids), t(q), half, backend="cuda", **KW)
    want = sf.apf_fuse(phi, pids, q, index, backend="cpu", **KW)
    finite = np.isfinite(want[1])
    np.testing.assert_allclose(got[1].cpu().numpy()[finite], want[1][finite], atol=0.5)
    with pytest.raises(TypeError, match="must be float32"):
        sf.apf_fuse(t(phi), t(pids), t(q), half, backend="triton", **KW)
