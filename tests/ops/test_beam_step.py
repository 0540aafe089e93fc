"""constrained_beam_step: parity with the reference, exhaustive search with wide beams, the
tie / padding / empty-request rules of DESIGN.md section 3, and determinism."""

import os
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sigma_fast as sf
from sigma_fast import reference
from sigma_fast.reference.beam_step import NORMALIZE
from sigma_fast.testing import (assert_beam_step_close, capture_cuda_graph, clustered_codes,
                                core_threads)

from conftest import backend_params, device_for

# Every backend; "reference" checks the op's dispatch to the reference. Triton runs on the CPU
# interpreter where there is no GPU (about 0.3 s a launch), so its hypothesis sweeps are
# separate tests with fewer examples there; cuda tests are skipped (with the reason) without a
# GPU.
STEP_BACKENDS = backend_params()
SWEEP_BACKENDS = backend_params(exclude=("triton",))
TRITON = backend_params(exclude=("reference", "cpu", "cuda"))
TRITON_EXAMPLES = 40 if torch.cuda.is_available() else 8
NEG = float("-inf")


def _on(backend, *tensors):
    """The tensors (None stays None) on the device the backend runs on."""
    dev = device_for(backend)
    return tuple(None if t is None else t.to(dev) for t in tensors)


def _step(backend, logits, scores, states, trie, *, allowed=None, **kwargs):
    """constrained_beam_step on the backend's device; outputs back on the CPU."""
    logits, scores, states, allowed = _on(backend, logits, scores, states, allowed)
    out = sf.constrained_beam_step(logits, scores, states, trie.to(logits.device),
                                   allowed=allowed, backend=backend, **kwargs)
    return type(out)(*(t.cpu() for t in out))

CATALOG = st.tuples(st.integers(1, 30), st.integers(1, 3), st.integers(1, 6),
                    st.integers(0, 2**31 - 1))
# Wider code ranges too: the log-sum-exp runs in 8-float lanes plus a tail.
WIDE_CATALOG = st.tuples(st.integers(1, 60), st.integers(1, 3),
                         st.sampled_from([1, 2, 3, 7, 8, 9, 17, 40]), st.integers(0, 2**31 - 1))


def _trie(n, levels, k, seed):
    codes = np.random.default_rng(seed).integers(0, k, size=(n, levels))
    return codes, sf.PrefixTrie(codes, codebook_size=k)


def _inputs(trie, batch, beams_in, rng, *, ties, strided, padding=0.3):
    """Logits, beam scores and states of random beams at random nodes (leaves included)."""
    k = trie.codebook_size
    shape = (batch, beams_in, k)
    if strided:  # a slice of a wider "LM vocabulary", every other beam row
        big = torch.from_numpy(rng.standard_normal((batch, 2 * beams_in, k + 5)).astype(np.float32))
        logits = big[:, ::2, 3:3 + k]
    else:
        logits = torch.empty(shape)
    vals = (rng.integers(-2, 3, size=shape) if ties else rng.standard_normal(shape) * 2)
    logits.copy_(torch.from_numpy(vals.astype(np.float32)))
    scores = (rng.integers(-3, 1, size=(batch, beams_in)) if ties
              else -rng.random((batch, beams_in)) * 4).astype(np.float32)
    scores[rng.random((batch, beams_in)) < padding] = NEG
    states = rng.integers(0, trie.num_nodes, size=(batch, beams_in))
    states[scores == NEG] = -1  # padding beams' states are ignored
    return logits, torch.from_numpy(scores), torch.from_numpy(states.astype(np.int64))


def _allowed(trie, kind, batch, rng):
    if kind == "none":
        return None
    masks = rng.random((batch if kind == "per_request" else 1, trie.item_id_bound)) < 0.5
    al = torch.from_numpy(trie.allowed_nodes(masks))
    return al[0] if kind == "shared" else al


STEP_SWEEP = dict(cat=WIDE_CATALOG, batch=st.integers(0, 4), beams_in=st.integers(0, 6),
                  beam_width=st.integers(1, 8), normalize=st.sampled_from(NORMALIZE),
                  allowed_kind=st.sampled_from(["none", "shared", "per_request"]),
                  ties=st.booleans(), strided=st.booleans())


@pytest.mark.parametrize("backend", SWEEP_BACKENDS)
@given(**STEP_SWEEP)
def test_step_matches_reference(backend, **params):
    _check_step_matches_reference(backend, **params)


@pytest.mark.parametrize("backend", TRITON)
@settings(max_examples=TRITON_EXAMPLES)
@given(**STEP_SWEEP)
def test_triton_step_matches_reference(backend, **params):
    _check_step_matches_reference(backend, **params)


def _check_step_matches_reference(backend, cat, batch, beams_in, beam_width, normalize,
                                  allowed_kind, ties, strided):
    n, levels, k, seed = cat
    _, trie = _trie(n, levels, k, seed)
    rng = np.random.default_rng(seed)
    logits, scores, states = _inputs(trie, batch, beams_in, rng, ties=ties, strided=strided)
    allowed = _allowed(trie, allowed_kind, batch, rng)
    got = _step(backend, logits, scores, states, trie, beam_width=beam_width, allowed=allowed,
                normalize=normalize, on_empty="pad")
    assert [t.dtype for t in got] == [torch.float32, torch.int64, torch.int64, torch.int64]
    assert all(t.shape == (batch, beam_width) for t in got)
    want = reference.constrained_beam_step(logits.numpy(), scores.numpy(), states.numpy(), trie,
                                           beam_width=beam_width, allowed=allowed,
                                           normalize=normalize, on_empty="pad")
    if normalize == "none":  # no log-sum-exp: every backend agrees bitwise, ties included
        for g, w in zip(got, want):
            assert np.array_equal(g.numpy(), w), (g, w)
    else:
        assert_beam_step_close(got, logits, scores, states, trie, beam_width=beam_width,
                               allowed=allowed, normalize=normalize)


# ------------------------------------------------------------------ multi-level search


def _search(trie, table, width, *, allowed=None, normalize="full", backend=None, batch=1):
    """Beam search over all levels with repeated steps; logits of a beam = table[its node].
    Returns (codes [B, W, L], scores [B, W])."""
    scores = torch.full((batch, width), NEG)
    scores[:, 0] = 0.0
    states = torch.zeros((batch, width), dtype=torch.int64)
    codes = torch.zeros((batch, width, 0), dtype=torch.int64)
    for _ in range(trie.num_levels):
        logits = table[states.clamp(min=0)]
        out = _step(backend or "", logits, scores, states, trie, beam_width=width,
                    allowed=allowed, normalize=normalize, on_empty="pad")
        index = out.parent.clamp(min=0)[..., None].expand(-1, -1, codes.shape[2])
        prev = torch.gather(codes, 1, index)
        codes = torch.cat([prev, out.token[..., None]], dim=2)
        scores, states = out.scores, out.states
    return codes, scores


def _exhaustive(codes, trie, table, item_mask, normalize):
    """{code tuple: summed float64 log-prob} over every allowed distinct code."""
    valid = np.ones(trie.num_nodes, bool) if item_mask is None else trie.allowed_nodes(item_mask)
    keep = np.ones(len(codes), bool) if item_mask is None else item_mask
    co, ct, cn = (trie.child_offsets.numpy(), trie.child_tokens.numpy(), trie.child_nodes.numpy())
    tab = table.double().numpy()
    out = {}
    for code in {tuple(c) for c in codes[keep].tolist()}:
        node, total = 0, 0.0
        for tok in code:
            row = tab[node]
            slots = range(co[node], co[node + 1])
            if normalize == "full":
                total += row[tok] - np.logaddexp.reduce(row)
            elif normalize == "valid":
                ok = [ct[e] for e in slots if valid[cn[e]]]
                total += row[tok] - np.logaddexp.reduce(row[ok])
            else:
                total += row[tok]
            node = next(cn[e] for e in slots if ct[e] == tok)
        out[code] = total
    return out


@pytest.mark.parametrize("backend", SWEEP_BACKENDS)
@pytest.mark.parametrize("normalize", NORMALIZE)
@given(cat=CATALOG, masked=st.booleans())
def test_wide_search_equals_exhaustive_enumeration(backend, normalize, cat, masked):
    _check_wide_search(backend, normalize, cat, masked)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("normalize", NORMALIZE)
@settings(max_examples=max(2, TRITON_EXAMPLES // 3))
@given(cat=CATALOG, masked=st.booleans())
def test_triton_wide_search_equals_exhaustive_enumeration(backend, normalize, cat, masked):
    _check_wide_search(backend, normalize, cat, masked)


def _check_wide_search(backend, normalize, cat, masked):
    n, levels, k, seed = cat
    codes, trie = _trie(n, levels, k, seed)
    rng = np.random.default_rng(seed)
    table = torch.from_numpy(rng.standard_normal((trie.num_nodes, k)).astype(np.float32))
    masks = rng.random((3, n)) < np.array([[0.0], [0.4], [1.0]]) if masked else None
    width = trie.nodes_per_level[-1]  # >= the number of candidates at every level
    allowed = None if masks is None else torch.from_numpy(trie.allowed_nodes(masks))
    got_codes, got_scores = _search(trie, table, width, allowed=allowed, normalize=normalize,
                                    backend=backend, batch=3)
    for b in range(3):
        want = _exhaustive(codes, trie, table, None if masks is None else masks[b], normalize)
        live = got_scores[b] > NEG
        got = {tuple(c): float(s) for c, s in zip(got_codes[b][live].tolist(), got_scores[b][live])}
        assert set(got) == set(want) and int(live.sum()) == len(want)
        for code, s in want.items():
            assert abs(got[code] - s) <= 1e-4 * (1 + abs(s)), (code, got[code], s)
        assert (got_scores[b][:-1] >= got_scores[b][1:]).all()


@given(cat=CATALOG, width=st.integers(1, 4), normalize=st.sampled_from(NORMALIZE))
def test_narrow_search_cpu_equals_reference(cat, width, normalize):
    n, levels, k, seed = cat
    _, trie = _trie(n, levels, k, seed)
    rng = np.random.default_rng(seed)
    table = torch.from_numpy(rng.standard_normal((trie.num_nodes, k)).astype(np.float32))
    got = _search(trie, table, width, normalize=normalize, backend="cpu", batch=2)
    want = _search(trie, table, width, normalize=normalize, backend="reference", batch=2)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-5)


def test_search_results_are_catalog_items_and_unique():
    codes = clustered_codes(400, 3, 16, clusters=30, noise=0.2, seed=4)
    trie = sf.PrefixTrie(codes, codebook_size=16)
    table = torch.randn(trie.num_nodes, 16, generator=torch.Generator().manual_seed(0))
    mask = np.random.default_rng(1).random(400) < 0.1
    got_codes, got_scores = _search(trie, table, 10, allowed=torch.from_numpy(
        trie.allowed_nodes(mask)))
    allowed_codes = {tuple(c) for c in codes[mask].tolist()}
    beams = [tuple(c) for c in got_codes[0].tolist()]
    assert len(set(beams)) == len(beams) == 10
    assert set(beams) <= allowed_codes


def test_search_is_invariant_to_catalog_row_order():
    codes = clustered_codes(300, 3, 8, clusters=25, noise=0.3, seed=6)
    perm = np.random.default_rng(0).permutation(300)
    a = sf.PrefixTrie(codes, codebook_size=8)
    b = sf.PrefixTrie(codes[perm], item_ids=perm, codebook_size=8)
    table = torch.randn(a.num_nodes, 8, generator=torch.Generator().manual_seed(1))
    mask = np.random.default_rng(2).random(300) < 0.3  # by item id
    ra = _search(a, table, 6, allowed=torch.from_numpy(a.allowed_nodes(mask)))
    rb = _search(b, table, 6, allowed=torch.from_numpy(b.allowed_nodes(mask)))
    assert torch.equal(ra[0], rb[0]) and torch.equal(ra[1], rb[1])


# --------------------------------------------------------------- rules, one at a time


def _toy():
    # root -> 0 -> {0, 1}; root -> 1 -> {2}; root -> 2 -> {0}
    codes = np.array([[0, 0], [0, 1], [1, 2], [2, 0], [0, 1]])
    return codes, sf.PrefixTrie(codes, codebook_size=3)


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_ties_go_to_the_smaller_parent_then_the_smaller_token(backend):
    _, trie = _toy()
    logits = torch.zeros((1, 3, 3))  # every candidate of a beam scores the same
    scores = torch.tensor([[-1.0, -1.0, -1.0]])
    states = torch.tensor([[2, 1, 3]])  # nodes (1), (0), (2)
    out = _step(backend, logits, scores, states, trie, beam_width=4, normalize="none")
    assert out.parent.tolist() == [[0, 1, 1, 2]] and out.token.tolist() == [[2, 0, 1, 0]]
    assert out.scores.tolist() == [[-1.0] * 4]


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_padding_beams_and_padded_outputs(backend):
    _, trie = _toy()
    logits = torch.randn(2, 3, 3)
    scores = torch.tensor([[0.0, NEG, NEG], [NEG, -0.5, NEG]])
    states = torch.tensor([[0, 77, -5], [-1, 0, 12345]])  # padding states are ignored
    out = _step(backend, logits, scores, states, trie, beam_width=5)
    # the root has 3 children: 3 beams, then 2 padding beams
    assert (out.parent[0, :3] == 0).all() and (out.parent[1, :3] == 1).all()
    assert out.scores[:, 3:].eq(NEG).all() and out.parent[:, 3:].eq(-1).all()
    assert out.token[:, 3:].eq(-1).all() and out.states[:, 3:].eq(-1).all()
    assert sorted(out.token[0, :3].tolist()) == [0, 1, 2]


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_a_request_without_candidates_raises_or_pads(backend):
    _, trie = _toy()
    logits = torch.randn(3, 2, 3)
    scores = torch.tensor([[0.0, NEG], [NEG, NEG], [0.0, NEG]])  # request 1: all padding
    states = torch.zeros((3, 2), dtype=torch.int64)
    with pytest.raises(ValueError, match="request 1 has no valid continuation"):
        _step(backend, logits, scores, states, trie, beam_width=2)
    out = _step(backend, logits, scores, states, trie, beam_width=2, on_empty="pad")
    assert out.parent[1].tolist() == [-1, -1] and out.scores[1].eq(NEG).all()
    assert out.parent[0].tolist() == [0, 0] and out.parent[2].tolist() == [0, 0]


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_masks_that_allow_nothing_under_a_beam(backend):
    codes, trie = _toy()
    item_mask = np.array([False, False, True, False, False])  # only [1, 2]
    allowed = torch.from_numpy(trie.allowed_nodes(item_mask))
    logits = torch.randn(1, 2, 3)
    states = torch.tensor([[2, 1]])  # node (1): has [1, 2]; node (0): nothing allowed below
    out = _step(backend, logits, torch.tensor([[-3.0, 0.0]]), states, trie, beam_width=3,
                allowed=allowed)
    assert out.parent.tolist() == [[0, -1, -1]] and out.token.tolist() == [[2, -1, -1]]
    # only the empty beam left: the request has no candidate at all
    with pytest.raises(ValueError, match="request 0 has no valid continuation"):
        _step(backend, logits[:, 1:], torch.tensor([[0.0]]), states[:, 1:], trie,
              beam_width=3, allowed=allowed)
    # an empty subset
    none = torch.from_numpy(trie.allowed_nodes(np.zeros(5, bool)))
    with pytest.raises(ValueError, match="request 0"):
        _step(backend, logits, torch.tensor([[0.0, 0.0]]), states, trie, beam_width=3,
              allowed=none)


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_shared_allowed_equals_per_request_copies(backend):
    codes = clustered_codes(200, 3, 8, clusters=20, seed=8)
    trie = sf.PrefixTrie(codes, codebook_size=8)
    rng = np.random.default_rng(0)
    logits, scores, states = _inputs(trie, 5, 4, rng, ties=False, strided=False, padding=0.0)
    shared = torch.from_numpy(trie.allowed_nodes(rng.random(200) < 0.3))
    a = _step(backend, logits, scores, states, trie, beam_width=6, allowed=shared,
              on_empty="pad")
    b = _step(backend, logits, scores, states, trie, beam_width=6,
              allowed=shared.expand(5, -1), on_empty="pad")
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_normalize_modes(backend):
    _, trie = _toy()
    logits = torch.tensor([[[1.0, 2.0, 3.0]]])
    args = (torch.tensor([[0.0]]), torch.tensor([[1]]), trie)  # node (0): tokens 0, 1
    full, valid, none = (_step(backend, logits, *args, beam_width=2, normalize=mode)
                         for mode in ("full", "valid", "none"))
    lsm_full = torch.log_softmax(logits[0, 0], 0)
    lsm_valid = torch.log_softmax(logits[0, 0, :2], 0)
    torch.testing.assert_close(full.scores[0], lsm_full[[1, 0]])
    torch.testing.assert_close(valid.scores[0], lsm_valid[[1, 0]])
    assert none.scores[0].tolist() == [2.0, 1.0]
    assert full.token.tolist() == valid.token.tolist() == none.token.tolist() == [[1, 0]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_upcast(dtype):
    codes = clustered_codes(100, 2, 8, clusters=10, seed=9)
    trie = sf.PrefixTrie(codes, codebook_size=8)
    logits, scores, states = _inputs(trie, 3, 4, np.random.default_rng(1), ties=False,
                                     strided=False, padding=0.0)
    low = logits.to(dtype)
    got = sf.constrained_beam_step(low, scores, states, trie, beam_width=5, on_empty="pad")
    want = sf.constrained_beam_step(low.float(), scores, states, trie, beam_width=5,
                                    on_empty="pad")
    for x, y in zip(got, want):
        assert torch.equal(x, y)


def test_numpy_in_numpy_out():
    _, trie = _toy()
    out = sf.constrained_beam_step(np.zeros((1, 1, 3), np.float32), np.zeros((1, 1), np.float32),
                                   np.zeros((1, 1), np.int64), trie, beam_width=2)
    assert all(isinstance(o, np.ndarray) for o in out)
    assert out.token.tolist() == [[0, 1]]


def test_deterministic_across_thread_counts():
    codes = clustered_codes(3000, 2, 256, clusters=300, noise=0.3, seed=10)
    trie = sf.PrefixTrie(codes, codebook_size=256)
    rng = np.random.default_rng(3)
    logits, scores, states = _inputs(trie, 64, 16, rng, ties=False, strided=True, padding=0.1)
    states[scores > NEG] = torch.from_numpy(rng.integers(0, trie.level_range(1)[1], size=int(
        (scores > NEG).sum())))  # root and depth-1 beams: many candidates
    allowed = torch.from_numpy(trie.allowed_nodes(rng.random((64, 3000)) < 0.5))
    runs = []
    for threads in (1, 2, 3, 4):
        with core_threads(threads):
            runs.append(sf.constrained_beam_step(logits, scores, states, trie, beam_width=20,
                                                 allowed=allowed, on_empty="pad", backend="cpu"))
    for run in runs[1:]:
        for x, y in zip(runs[0], run):
            assert torch.equal(x, y)
    assert_beam_step_close(runs[0], logits, scores, states, trie, beam_width=20, allowed=allowed)


def _pool_case(seed=3, batch=64):
    """A step big enough to be split over the thread pool (depth-1 beams, many candidates)."""
    codes = clustered_codes(3000, 2, 256, clusters=300, noise=0.3, seed=10)
    trie = sf.PrefixTrie(codes, codebook_size=256)
    rng = np.random.default_rng(seed)
    logits, scores, states = _inputs(trie, batch, 16, rng, ties=False, strided=True, padding=0.1)
    states[scores > NEG] = torch.from_numpy(rng.integers(0, trie.level_range(1)[1], size=int(
        (scores > NEG).sum())))
    return trie, logits, scores, states


def test_concurrent_calls_from_python_threads_match_serial_results():
    import threading

    trie, _, _, _ = _pool_case()
    cases = [_pool_case(seed=s)[1:] for s in range(4)]
    with core_threads(3):
        want = [sf.constrained_beam_step(*c, trie, beam_width=20, backend="cpu") for c in cases]
        bad = [t.clone() for t in cases[0]]
        bad[0][40, 0, 5] = float("nan")
        bad[1][40, 0], bad[2][40, 0] = 0.0, 0  # make sure the poisoned beam is live
        errors, mismatches = [], []

        def worker(i):
            for _ in range(15):
                if i == 4:  # a failing step among the others: its error stays its own
                    try:
                        sf.constrained_beam_step(*bad, trie, beam_width=20, backend="cpu")
                    except ValueError as exc:
                        errors.append(str(exc))
                    continue
                got = sf.constrained_beam_step(*cases[i], trie, beam_width=20, backend="cpu")
                if not all(torch.equal(x, y) for x, y in zip(got, want[i])):
                    mismatches.append(i)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not mismatches
    assert len(errors) == 15 and all("at request 40, beam 0" in e for e in errors)


def test_pool_reports_the_smallest_failing_request():
    trie, logits, scores, states = _pool_case()
    logits = logits.clone()
    for b in (57, 41, 63):
        logits[b, 1, 3] = float("nan")
        scores[b, 1], states[b, 1] = -1.0, 0
    for threads in (1, 2, 4):
        with core_threads(threads), pytest.raises(ValueError,
                                                  match="at request 41, beam 1, index 3"):
            sf.constrained_beam_step(logits, scores, states, trie, beam_width=20, backend="cpu")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_threaded_step_works_in_a_forked_child():
    trie, logits, scores, states = _pool_case()
    with core_threads(2):
        want = sf.constrained_beam_step(logits, scores, states, trie, beam_width=20)  # pool up
        pid = os.fork()
        if pid == 0:  # child: the parent's workers do not exist here
            code = 1
            try:
                got = sf.constrained_beam_step(logits, scores, states, trie, beam_width=20)
                code = 0 if all(torch.equal(x, y) for x, y in zip(got, want)) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_fast_path_layouts_give_the_general_path_results():
    trie, logits, scores, states = _pool_case(batch=8)
    want = sf.constrained_beam_step(logits.contiguous(), scores, states, trie, beam_width=7,
                                    backend="reference")
    for lg, sc, stt in [
        (logits, scores, states),
        (logits, scores.t().contiguous().t(), states.t().contiguous().t()),  # column-major
        (logits.transpose(0, 1).contiguous().transpose(0, 1), scores, states),
        (logits.transpose(1, 2).contiguous().transpose(1, 2), scores, states),  # strided rows
    ]:
        got = sf.constrained_beam_step(lg, sc, stt, trie, beam_width=7)
        assert_beam_step_close(got, logits, scores, states, trie, beam_width=7)
        assert torch.equal(got.parent, want.parent) and torch.equal(got.token, want.token)


def test_fast_path_unusual_tensors_give_the_reference_results():
    """Tensors whose memory is not laid out as their values suggest: expanded (stride 0)
    logits rows and masks, a lazily negated view, rows of a mask that are not contiguous,
    inputs that require grad. Every one must give the reference step on the plain values."""
    trie, logits, scores, states = _pool_case(batch=6)
    b, w, _ = logits.shape
    rng = np.random.default_rng(1)
    mask = torch.from_numpy(trie.allowed_nodes(rng.random(3000) < 0.5))
    per_request = torch.from_numpy(
        np.stack([trie.allowed_nodes(rng.random(3000) < 0.5) for _ in range(b)]))
    one_row = logits[:, :1].expand(b, w, 256)  # every beam of a request reads the same row
    cases = [
        (one_row, scores, states, None),
        (torch._neg_view(-logits), scores, states, None),
        (logits, torch._neg_view(-scores), torch._neg_view(-states), None),
        (logits.clone().requires_grad_(True), scores.clone().requires_grad_(True), states, None),
        (logits, scores, states, mask),
        (logits, scores, states, mask.expand(b, -1)),
        (logits, scores, states, per_request),
        (logits, scores, states, per_request.t().contiguous().t()),  # column-major rows
        (logits, scores, states, mask[None]),
    ]
    for i, (lg, sc, st, al) in enumerate(cases):
        if al is not None and al.shape[0] == 1:  # [1, N] for B = 6 requests: not a shape
            with pytest.raises(ValueError, match=r"allowed must be a mask \[trie.num_nodes = "):
                sf.constrained_beam_step(lg, sc, st, trie, beam_width=9, allowed=al,
                                         on_empty="pad")
            continue
        plain = [t.detach().resolve_neg().contiguous().numpy() for t in (lg, sc, st)]
        want = reference.constrained_beam_step(
            *plain, trie, beam_width=9, allowed=None if al is None else al.contiguous().numpy(),
            on_empty="pad")
        got = sf.constrained_beam_step(lg, sc, st, trie, beam_width=9, allowed=al,
                                       on_empty="pad")
        assert np.array_equal(got.parent.numpy(), want[1]), i
        assert np.array_equal(got.token.numpy(), want[2]), i
        np.testing.assert_allclose(got.scores.numpy(), want[0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_huge_finite_logits_are_not_errors(backend):
    """Rows whose sum overflows float32 are finite all the same: no NaN / +inf error."""
    _, trie = _toy()
    logits = torch.tensor([[[3e38, 3e38, -3e38], [1.0, 2.0, 3.0]]])
    scores, states = torch.tensor([[0.0, -1.0]]), torch.tensor([[1, 2]])
    got = _step(backend, logits, scores, states, trie, beam_width=3, on_empty="pad")
    want = reference.constrained_beam_step(logits.numpy(), scores.numpy(), states.numpy(),
                                           trie, beam_width=3, on_empty="pad")
    assert np.array_equal(got[1].numpy(), want[1]) and np.array_equal(got[2].numpy(), want[2])
    np.testing.assert_allclose(got[0].numpy(), want[0], rtol=1e-5)


# --------------------------------------------------------------------------- bad input


def _good():
    _, trie = _toy()
    return dict(logits=torch.zeros((2, 3, 3)), beam_scores=torch.zeros((2, 3)),
                states=torch.zeros((2, 3), dtype=torch.int64), trie=trie)


I64, F64 = torch.int64, torch.float64
NAN, INF = float("nan"), float("inf")
BAD_INPUTS = [
    (dict(logits=torch.zeros((2, 3, 3), dtype=F64)), {}, TypeError,
     "logits must be float32 or bfloat16 or float16; got float64"),
    (dict(logits=torch.zeros((2, 3))), {}, ValueError, "logits must be 3-d [B, W_in, K]"),
    (dict(logits=torch.zeros((2, 3, 4))), {}, ValueError, "K = 3 (trie.codebook_size)"),
    (dict(beam_scores=torch.zeros((2, 3), dtype=F64)), {}, TypeError,
     "beam_scores must be float32; got float64"),
    (dict(beam_scores=torch.zeros((2, 2))), {}, ValueError, "must be [B, W_in] = [2, 3]"),
    (dict(states=torch.zeros((2, 3), dtype=torch.int32)), {}, TypeError,
     "states must be int64; got int32"),
    (dict(states=torch.tensor([[0, 0, 0], [0, 9, 0]])), {}, IndexError,
     "states must lie in [0, 8) for non-padding beams; got 9 at request 1, beam 1"),
    (dict(states=torch.tensor([[0, 0, 0], [-1, 0, 0]])), {}, IndexError,
     "got -1 at request 1, beam 0"),
    (dict(beam_scores=torch.tensor([[0.0, NAN, 0.0], [0.0] * 3])), {}, ValueError,
     "beam_scores must be finite or -inf"),
    (dict(beam_scores=torch.tensor([[0.0, INF, 0.0], [0.0] * 3])), {}, ValueError,
     "got inf at request 0, beam 1"),
    (dict(trie="trie"), {}, TypeError, "trie must be a sigma_fast.PrefixTrie; got str"),
    ({}, dict(beam_width=0), ValueError, "beam_width must be >= 1; got 0"),
    ({}, dict(beam_width=2.0), TypeError, "beam_width must be an int; got float"),
    ({}, dict(normalize="softmax"), ValueError,
     "normalize must be one of ('full', 'valid', 'none'); got 'softmax'"),
    ({}, dict(on_empty="skip"), ValueError,
     "on_empty must be one of ('error', 'pad'); got 'skip'"),
    ({}, dict(allowed=torch.ones(8, dtype=I64)), TypeError, "allowed must be bool; got int64"),
    ({}, dict(allowed=torch.tensor(True)), ValueError,
     "allowed must be a mask [trie.num_nodes = 8] shared by every request or [B = 2, "
     "trie.num_nodes = 8] per request; got shape []"),
    ({}, dict(allowed=torch.ones((1, 2, 8), dtype=torch.bool)), ValueError,
     "allowed must be a mask [trie.num_nodes = 8] shared by every request or [B = 2, "
     "trie.num_nodes = 8] per request; got shape [1, 2, 8]"),
    ({}, dict(allowed=torch.ones((3, 8), dtype=torch.bool)), ValueError,
     "allowed must be a mask [trie.num_nodes = 8] shared by every request or [B = 2, "
     "trie.num_nodes = 8] per request; got shape [3, 8]"),
    ({}, dict(backend="gpu"), ValueError, "backend must be one of"),
    ({}, dict(backend="cuda"), (ValueError, RuntimeError), "cuda"),  # CPU tensors / no GPU
]


@pytest.mark.parametrize("change, kwargs, exc, words", BAD_INPUTS)
def test_step_rejects_bad_input(change, kwargs, exc, words):
    args = {**_good(), **change}
    with pytest.raises(exc) as info:
        sf.constrained_beam_step(args["logits"], args["beam_scores"], args["states"], args["trie"],
                                 beam_width=kwargs.pop("beam_width", 2), **kwargs)
    assert words in str(info.value)


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_step_rejects_nan_logits(backend, bad):
    args = _good()
    args["logits"][1, 2, 1] = bad
    with pytest.raises(ValueError, match=r"logits must not be NaN or \+inf; got .* at request 1, "
                                         r"beam 2, index 1"):
        _step(backend, *args.values(), beam_width=2)
    args["beam_scores"][1, 2] = NEG  # a padding beam's row is not read
    _step(backend, *args.values(), beam_width=2)


BAD_VALUES = [  # (beam_scores, states) changes, error, message; checked by every backend
    ((1, 1, NAN, None), ValueError, "beam_scores must be finite or -inf (padding); got nan at "
                                    "request 1, beam 1"),
    ((0, 2, INF, None), ValueError, "got inf at request 0, beam 2"),
    ((1, 0, None, 9), IndexError, "states must lie in [0, 8) for non-padding beams; got 9 at "
                                  "request 1, beam 0"),
    ((0, 1, None, -1), IndexError, "got -1 at request 0, beam 1"),
]


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("change, exc, words", BAD_VALUES)
def test_step_rejects_bad_values(backend, change, exc, words):
    args = _good()
    b, w, score, state = change
    if score is not None:
        args["beam_scores"][b, w] = score
    if state is not None:
        args["states"][b, w] = state
    if w + 1 < 3:  # a later failing beam: the first one (in beam order) is reported
        args["states"][b, w + 1] = 12345
    if b == 0:  # a later failing request: the smallest one is reported
        args["beam_scores"][1, 0] = NAN
    with pytest.raises(exc) as info:
        _step(backend, *args.values(), beam_width=2)
    assert words in str(info.value)


@pytest.mark.parametrize("backend", backend_params(exclude=("reference", "cpu")))
def test_device_backends_poison_bad_requests_without_raising_when_padding(backend):
    # on_empty="pad" never synchronizes, so bad values cannot raise: the request's beams get
    # NaN scores (-1 elsewhere) and the other requests are unaffected.
    args = _good()
    args["logits"][1, 0, 2] = NAN
    out = _step(backend, *args.values(), beam_width=2, on_empty="pad")
    assert out.scores[1].isnan().all() and out.parent[1].eq(-1).all()
    assert out.token[1].eq(-1).all() and out.states[1].eq(-1).all()
    assert out.parent[0].tolist() == [0, 0] and out.token[0].tolist() == [0, 1]


def test_minus_inf_logits_are_impossible_tokens():
    _, trie = _toy()
    logits = torch.tensor([[[NEG, 0.0, NEG]]])
    out = sf.constrained_beam_step(logits, torch.zeros((1, 1)),
                                   torch.zeros((1, 1), dtype=torch.int64), trie, beam_width=3)
    assert out.token.tolist() == [[1, -1, -1]] and out.scores[0, 0] == 0.0
    with pytest.raises(ValueError, match="request 0 has no valid continuation"):
        sf.constrained_beam_step(torch.full((1, 1, 3), NEG), torch.zeros((1, 1)),
                                 torch.zeros((1, 1), dtype=torch.int64), trie, beam_width=3)


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("k", [8, 40, 256])
def test_rows_with_many_minus_inf_logits_match_the_reference(backend, k):
    """-inf logits anywhere in a row (the vector lanes and the tail): they are impossible
    tokens, and the row's normalizer and bounds must ignore them."""
    codes = clustered_codes(400, 2, k, clusters=40, noise=0.3, seed=k)
    trie = sf.PrefixTrie(codes, codebook_size=k)
    rng = np.random.default_rng(k)
    logits, scores, states = _inputs(trie, 4, 6, rng, ties=False, strided=True, padding=0.1)
    logits[torch.from_numpy(rng.random(tuple(logits.shape)) < 0.3)] = NEG
    logits[0, 0] = NEG  # a whole row
    for normalize in NORMALIZE:
        got = _step(backend, logits, scores, states, trie, beam_width=5, normalize=normalize,
                    on_empty="pad")
        assert_beam_step_close(got, logits, scores, states, trie, beam_width=5,
                               normalize=normalize)


def test_trie_on_another_device_is_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    args = _good()
    with pytest.raises(ValueError, match="trie must be on the same device as logits"):
        sf.constrained_beam_step(args["logits"].cuda(), args["beam_scores"].cuda(),
                                 args["states"].cuda(), args["trie"], beam_width=2)


# ------------------------------------------------------------------------ torch integration


def test_custom_op_is_registered_and_passes_opcheck():
    assert hasattr(torch.ops.sigma_fast, "constrained_beam_step")
    args = _good()
    trie = args["trie"]
    for allowed in (None, torch.ones(trie.num_nodes, dtype=torch.bool)):
        torch.library.opcheck(
            torch.ops.sigma_fast.constrained_beam_step.default,
            (torch.randn(2, 3, 3), torch.zeros(2, 3), torch.zeros((2, 3), dtype=torch.int64),
             trie.child_offsets, trie.child_tokens, trie.child_nodes, allowed, 4, "full", "pad",
             ""),
            test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    codes = clustered_codes(200, 3, 8, clusters=20, seed=11)
    trie = sf.PrefixTrie(codes, codebook_size=8)
    logits, scores, states = _inputs(trie, 3, 4, np.random.default_rng(5), ties=False,
                                     strided=False, padding=0.2)
    allowed = torch.from_numpy(trie.allowed_nodes(np.random.default_rng(6).random(200) < 0.5))

    def step(lg, sc, stt):
        out = sf.constrained_beam_step(lg * 1.0, sc, stt, trie, beam_width=5, allowed=allowed,
                                       on_empty="pad")
        return out.scores + 0.0, out.parent, out.token, out.states

    got = torch.compile(step, fullgraph=True)(logits, scores, states)
    want = step(logits, scores, states)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------- cross-backend


@pytest.mark.parametrize("backend", backend_params(exclude=("reference", "cpu")))
def test_trie_built_on_cpu_searches_on_another_backend(backend):
    codes = clustered_codes(120, 3, 6, clusters=15, noise=0.3, seed=12)
    trie = sf.PrefixTrie(codes, codebook_size=6)  # built on the CPU
    dev = device_for(backend)
    moved = trie.to(dev)
    assert moved.device.type == dev and moved.num_nodes == trie.num_nodes
    table = torch.randn(trie.num_nodes, 6, generator=torch.Generator().manual_seed(3))
    mask = np.random.default_rng(4).random((2, 120)) < 0.5
    allowed = torch.from_numpy(trie.allowed_nodes(mask))
    got = _search(trie, table, 5, allowed=allowed, backend=backend, batch=2)
    want = _search(trie, table, 5, allowed=allowed, backend="cpu", batch=2)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------- CUDA: requests over blocks

CUDA_ONLY = backend_params(exclude=("reference", "cpu", "triton"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", CUDA_ONLY)
@pytest.mark.parametrize("splits, rank_max", [("1", "0"), ("1", "1024"), ("2", "0"),
                                              ("2", "512"), ("3", "8"), ("8", "0")])
@settings(max_examples=30, deadline=None)
@given(cat=WIDE_CATALOG, batch=st.integers(1, 3), beams_in=st.integers(1, 24),
       beam_width=st.integers(1, 12), normalize=st.sampled_from(NORMALIZE),
       allowed_kind=st.sampled_from(["none", "per_request"]), ties=st.booleans())
def test_cuda_split_step_matches_reference(backend, splits, rank_max, **params):
    """SIGMA_FAST_BEAM_SPLITS forces how many blocks share a request (the split step: each
    block keeps its beams' top W, a merge kernel ranks the union) and SIGMA_FAST_BEAM_RANK_MAX
    up to how many candidates a block ranks directly instead of by radix select (0: never);
    every setting must give the reference's result, ties included."""
    env = {"SIGMA_FAST_BEAM_SPLITS": splits, "SIGMA_FAST_BEAM_RANK_MAX": rank_max}
    with mock.patch.dict(os.environ, env):
        _check_step_matches_reference(backend, strided=True, **params)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", CUDA_ONLY)
@pytest.mark.parametrize("splits", ["1", "4"])
def test_cuda_split_step_reports_the_first_failing_beam(backend, splits, monkeypatch):
    monkeypatch.setenv("SIGMA_FAST_BEAM_SPLITS", splits)
    _, trie = _trie(200, 3, 9, seed=3)
    rng = np.random.default_rng(4)
    logits, scores, states = _inputs(trie, 2, 16, rng, ties=False, strided=False, padding=0.0)
    logits[1, 13, 4] = NAN  # a later block's beam ...
    states[1, 6] = trie.num_nodes + 3  # ... and an earlier one: beam 6 is reported
    with pytest.raises(IndexError, match="request 1, beam 6"):
        _step(backend, logits, scores, states, trie, beam_width=4)
    out = _step(backend, logits, scores, states, trie, beam_width=4, on_empty="pad")
    assert out.scores[1].isnan().all() and out.parent[1].eq(-1).all()
    want = _step("cpu", logits[:1], scores[:1], states[:1], trie, beam_width=4)
    assert torch.equal(out.parent[0], want.parent[0]) and torch.equal(out.token[0], want.token[0])


# ----------------------------------------------------------------------------- CUDA graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", backend_params(exclude=("reference", "cpu")))
@pytest.mark.parametrize("allowed_kind", ["none", "per_request"])
@pytest.mark.parametrize("beams_in, splits", [(6, None), (20, "2")])  # "2": two kernels
def test_step_is_capturable_in_a_cuda_graph(backend, allowed_kind, beams_in, splits):
    """With on_empty="pad" the device step launches without a host sync, so it can be captured
    once and replayed on new inputs copied into the captured tensors: every replay must give
    the eager step's result on those inputs."""
    with mock.patch.dict(os.environ, {} if splits is None else {"SIGMA_FAST_BEAM_SPLITS": splits}):
        _check_graph_replays(backend, allowed_kind, beams_in)


def _check_graph_replays(backend, allowed_kind, beams_in):
    rng = np.random.default_rng(21)
    _, trie = _trie(300, 3, 17, seed=5)
    dev = torch.device("cuda")
    gtrie = trie.to(dev)
    batch, width = 3, 5

    def fresh():
        lg, sc, st_ = _inputs(trie, batch, beams_in, rng, ties=False, strided=False)
        al = _allowed(trie, allowed_kind, batch, rng)
        return tuple(None if t is None else t.to(dev) for t in (lg, sc, st_, al))

    def step(lg, sc, st_, al):
        return sf.constrained_beam_step(lg, sc, st_, gtrie, beam_width=width, allowed=al,
                                        on_empty="pad", backend=backend)

    static = fresh()
    replay, out = capture_cuda_graph(lambda: step(*static))
    for _ in range(3):
        new = fresh()
        for dst, src in zip(static, new):
            if dst is not None:
                dst.copy_(src)
        replay()
        want = step(*new)
        torch.cuda.synchronize()
        for got_t, want_t in zip(out, want):
            assert torch.equal(got_t, want_t)
        lg, sc, st_, al = (None if t is None else t.cpu() for t in new)
        assert_beam_step_close(tuple(t.cpu() for t in out), lg, sc, st_, trie,
                               beam_width=width, allowed=al)
