"""Helpers for testing code that uses sigma_fast (and for sigma_fast's own tests)."""

from __future__ import annotations

import numpy as np
import torch

import contextlib

from . import reference


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def clustered_vectors(n: int, d: int, *, clusters: int = 64, noise: float = 0.3,
                      seed: int = 0) -> np.ndarray:
    """float32 [n, d] drawn around ``clusters`` Gaussian centres: a stand-in for item
    embeddings (real embeddings are clustered, which is what makes RQ useful)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    pick = rng.integers(clusters, size=n)
    return (centres[pick] + noise * rng.standard_normal((n, d))).astype(np.float32)


def rq_tolerance(x, codebooks, rtol: float = 1e-4) -> np.ndarray:
    """Per-row distance tolerance for comparing float32 kernels with the reference: rtol times
    the scale of the squared norms involved (||x||^2 + the largest ||c||^2 summed over levels)."""
    x = _np(x).astype(np.float64)
    cb = _np(codebooks).astype(np.float64)
    scale = (x * x).sum(axis=1) + (cb * cb).sum(axis=2).max(axis=1).sum()
    return rtol * scale + 1e-6


def assert_rq_codes_close(x, codebooks, codes, *, beam_width: int = 1, rtol: float = 1e-4,
                          err=None) -> None:
    """Tie-aware check of backend codes against the reference.

    Rows whose reference decisions are separated by more than the tolerance (see
    ``reference.rq_encode(margins=...)``) must match exactly; near-tie rows must reach a final
    error within the tolerance of the reference's. ``err`` (the backend's reported errors) is
    checked against the reference's too.
    """
    x_np, cb_np, got = _np(x), _np(codebooks), _np(codes)
    n = x_np.shape[0]
    margins = np.empty((n,), dtype=np.float64)
    ref_codes, ref_err = reference.rq_encode(x_np, cb_np, beam_width=beam_width, margins=margins)
    assert got.shape == ref_codes.shape, f"codes shape {got.shape} != reference {ref_codes.shape}"
    tol = rq_tolerance(x_np, cb_np, rtol)
    clear = margins > tol
    mismatch = np.nonzero(clear & (got != ref_codes).any(axis=1))[0]
    assert len(mismatch) == 0, (
        f"{len(mismatch)} rows with unambiguous decisions differ from the reference; first row "
        f"{mismatch[0]}: got {got[mismatch[0]].tolist()}, reference "
        f"{ref_codes[mismatch[0]].tolist()} (margin {margins[mismatch[0]]:.3g}, "
        f"tolerance {tol[mismatch[0]]:.3g})"
    )
    if n:
        # Near-tie rows: the backend's answer must be as good as the reference's, to rounding.
        recon = reference.rq_decode(got, cb_np).astype(np.float64)
        got_err = ((x_np.astype(np.float64) - recon) ** 2).sum(axis=1)
        worse = np.nonzero(got_err > ref_err.astype(np.float64) + tol)[0]
        if beam_width > 1:  # beam search on a near-tie may legitimately take another path
            worse = worse[clear[worse]]
        assert len(worse) == 0, (
            f"row {worse[0]}: codes {got[worse[0]].tolist()} have error {got_err[worse[0]]:.6g}, "
            f"reference {ref_codes[worse[0]].tolist()} has {ref_err[worse[0]]:.6g}"
        )
    if err is not None:
        e = _np(err).astype(np.float64)
        recon = reference.rq_decode(got, cb_np).astype(np.float64)
        want = ((x_np.astype(np.float64) - recon) ** 2).sum(axis=1)
        bad = np.nonzero(np.abs(e - want) > tol)[0]
        assert len(bad) == 0, (
            f"row {bad[0]}: reported error {e[bad[0]]:.6g}, recomputed {want[bad[0]]:.6g}"
        )


# ------------------------------------------------------------------------------------ APF


def assert_topk_close(got_ids, got_scores, want_ids, want_scores, *, atol, pad_id: int = -1,
                      what: str = "top-k") -> np.ndarray:
    """Tie-aware comparison of top-k lists ``[..., k]`` sorted best first, padded at the end
    with ``pad_id`` (scores are then -inf).

    Checks, per row: the same number of valid entries; scores equal position by position
    within ``atol`` (a scalar or one value per row); ids equal as sets within each run of
    positions whose ``want`` scores chain within ``2 * atol`` (so a single-position run must
    match exactly). In a full row the last run may hold other items (a near-tie at the cut-off
    can pick another candidate); they must still be distinct. Returns a bool mask of the
    positions whose ids must match exactly, for comparing outputs aligned with them.
    """
    gi, gs, wi, ws = (_np(a) for a in (got_ids, got_scores, want_ids, want_scores))
    assert gi.shape == wi.shape, f"{what}: ids shape {gi.shape} != expected {wi.shape}"
    k = wi.shape[-1]
    gi, gs, wi, ws = (a.reshape(-1, k) for a in (gi, gs, wi, ws))
    tol = np.broadcast_to(np.asarray(atol, dtype=np.float64).reshape(-1), (gi.shape[0],))
    clear = np.zeros(gi.shape, dtype=bool)
    for r in range(gi.shape[0]):
        nv = int((wi[r] != pad_id).sum())
        assert int((gi[r] != pad_id).sum()) == nv and (gi[r, nv:] == pad_id).all(), (
            f"{what} row {r}: {int((gi[r] != pad_id).sum())} results, expected {nv}: got "
            f"{gi[r].tolist()}, expected {wi[r].tolist()}")
        assert np.all(gs[r, nv:] == -np.inf), f"{what} row {r}: padding scores must be -inf"
        diff = np.abs(gs[r, :nv].astype(np.float64) - ws[r, :nv].astype(np.float64))
        bad = np.nonzero(diff > tol[r])[0]
        assert len(bad) == 0, (
            f"{what} row {r}, position {bad[0] if len(bad) else -1}: score "
            f"{gs[r, bad[0]] if len(bad) else 0:.9g} vs expected "
            f"{ws[r, bad[0]] if len(bad) else 0:.9g} (atol {tol[r]:.3g})")
        assert len(set(gi[r, :nv].tolist())) == nv, f"{what} row {r}: repeated ids {gi[r].tolist()}"
        start = 0
        for j in range(1, nv + 1):
            if j == nv or ws[r, j - 1] - ws[r, j] > 2 * tol[r]:
                last_run = j == nv and nv == k
                if not last_run:
                    got_set, want_set = set(gi[r, start:j].tolist()), set(wi[r, start:j].tolist())
                    assert got_set == want_set, (
                        f"{what} row {r}, positions {start}..{j - 1}: ids {sorted(got_set)}, "
                        f"expected {sorted(want_set)} (scores {ws[r, start:j].tolist()})")
                    clear[r, start:j] = j - start == 1
                start = j
    return clear.reshape(_np(want_ids).shape)


def apf_temperatures(prefix_scores, *, tau: float, adaptive: bool = True,
                     sigma_min: float = 1e-3) -> np.ndarray:
    """t_b of every request (float64 [B]; 0 for a request without finite scores)."""
    phi = _np(prefix_scores).astype(np.float64)
    out = np.zeros(phi.shape[0])
    for b, row in enumerate(phi):
        fin = row[np.isfinite(row)]
        if len(fin):
            out[b] = (max(float(np.std(fin)), sigma_min) if adaptive else 1.0) / tau
    return out


def apf_tolerance(prefix_scores, dim: int, *, tau: float, adaptive: bool = True,
                  sigma_min: float = 1e-3) -> tuple[float, np.ndarray]:
    """``(sim_atol, logp_atol [B])`` between a float32 backend and the reference: a float32
    inner product of unit vectors is within D·2^-24 of the exact one, log P moves by at most
    2·t_b times that (its own term and the logsumexp), plus float32 rounding of log P."""
    sim_atol = max(2.0 * dim * 2.0 ** -24, 1e-6)
    phi = _np(prefix_scores).astype(np.float64)
    t = apf_temperatures(phi, tau=tau, adaptive=adaptive, sigma_min=sigma_min)
    scale = np.where(np.isfinite(phi), np.abs(phi), 0).max(axis=1, initial=0) + t + 10.0
    return sim_atol, 2.0 * t * sim_atol + 4.0 * 2.0 ** -24 * scale


def assert_apf_close(got, want, prefix_scores, dim: int, *, tau: float, adaptive: bool = True,
                     sigma_min: float = 1e-3) -> None:
    """Compare two ``apf_fuse`` results (3 or 5 outputs) tie-aware, with
    ``apf_tolerance``: ids exact wherever scores are separated, source ranks wherever ids
    must match, per-beam top-M lists (when present) likewise."""
    assert len(got) == len(want), f"{len(got)} outputs, expected {len(want)}"
    sim_atol, logp_atol = apf_tolerance(prefix_scores, dim, tau=tau, adaptive=adaptive,
                                        sigma_min=sigma_min)
    g_src, w_src, g_ids, w_ids = _np(got[2]), _np(want[2]), _np(got[0]), _np(want[0])
    # Without dedup an item may come once per beam: compare (item, beam) pairs.
    beams = int(max(g_src.max(initial=0), w_src.max(initial=0))) + 1
    keys = [np.where(i >= 0, i * beams + np.maximum(s, 0), -1) for i, s in ((g_ids, g_src),
                                                                          (w_ids, w_src))]
    clear = assert_topk_close(keys[0], got[1], keys[1], want[1], atol=logp_atol,
                              what="apf top-N (item * K + beam)")
    assert np.array_equal(g_src == -1, g_ids == -1), "source ranks must be -1 exactly at padding"
    bad = np.argwhere(clear & (g_src != w_src))
    assert len(bad) == 0, (f"source rank at {bad[0].tolist()}: {g_src[tuple(bad[0])]}, expected "
                           f"{w_src[tuple(bad[0])]} (item {w_ids[tuple(bad[0])]})")
    if len(want) == 5:
        assert_topk_close(got[3], got[4], want[3], want[4], atol=sim_atol, what="apf top-M")


# ----------------------------------------------------------------- trie and beam step


def clustered_codes(n: int, levels: int, k: int, *, clusters: int = 1024, noise: float = 0.1,
                    seed: int = 0) -> np.ndarray:
    """int64 [n, levels] semantic-ID-like codes in [0, k): each row copies one of ``clusters``
    random centre codes and replaces each level with a uniform token with probability
    ``noise``, so prefixes are shared unevenly and full codes collide (as RQ codes do)."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(0, k, size=(clusters, levels))
    codes = centres[rng.integers(0, clusters, size=n)]
    flip = rng.random((n, levels)) < noise
    codes[flip] = rng.integers(0, k, size=int(flip.sum()))
    return codes.astype(np.int64)


def assert_beam_step_close(got, logits, beam_scores, states, trie, *, beam_width: int,
                           allowed=None, normalize: str = "full", atol: float = 2e-5,
                           rtol: float = 2e-6) -> None:
    """Tie-aware check of a ``constrained_beam_step`` result against the reference.

    ``got`` is ``(scores, parent, token, states)``. Per request: the same number of
    non-padding beams, padding exactly (-inf, -1, -1, -1); every beam is a distinct valid
    candidate whose reference score is within ``atol + rtol * |score|`` of the reported one;
    the output is ordered by (score descending, parent, token); scores match the reference
    position by position; (parent, token) match exactly wherever the reference's score is
    separated from its neighbours by more than twice the tolerance, and every candidate that
    clearly beats the W-th reference score is present. With ``normalize="none"`` backends
    agree bitwise, so compare with ``np.array_equal`` instead for the strictest check.
    """
    g_scores, g_parent, g_token, g_states = (_np(a) for a in got)
    lg, bs, stt = _np(logits), _np(beam_scores), _np(states)
    al = None if allowed is None else _np(allowed)
    batch, beams_in, k = lg.shape
    # All candidates, sorted, from the reference with a beam width that keeps every one.
    every = reference.constrained_beam_step(lg, bs, stt, trie, beam_width=max(1, beams_in * k),
                                            allowed=al, normalize=normalize, on_empty="pad")
    assert g_scores.shape == (batch, beam_width), f"scores shape {g_scores.shape}"
    for b in range(batch):
        c_scores = every[0][b].astype(np.float64)
        live = c_scores > -np.inf
        cands = {(int(p), int(t)): (float(s), int(v)) for s, p, t, v in
                 zip(c_scores[live], every[1][b][live], every[2][b][live], every[3][b][live])}
        nv = min(beam_width, len(cands))
        pad = slice(nv, beam_width)
        assert (g_scores[b, pad] == -np.inf).all() and (g_parent[b, pad] == -1).all() and (
            g_token[b, pad] == -1).all() and (g_states[b, pad] == -1).all(), (
            f"request {b}: expected {nv} beams then padding; got parents {g_parent[b].tolist()}, "
            f"scores {g_scores[b].tolist()}")
        keys = [(int(p), int(t)) for p, t in zip(g_parent[b, :nv], g_token[b, :nv])]
        assert len(set(keys)) == nv, f"request {b}: repeated beams {keys}"
        order = [(-float(s), p, t) for s, (p, t) in zip(g_scores[b, :nv], keys)]
        assert order == sorted(order), f"request {b}: beams not in (score, parent, token) order"
        tol = lambda s: atol + rtol * abs(s)  # noqa: E731
        for j, key in enumerate(keys):
            assert key in cands, f"request {b}, beam {j}: (parent, token) {key} is not a candidate"
            s, v = cands[key]
            assert abs(float(g_scores[b, j]) - s) <= tol(s), (
                f"request {b}, beam {j} {key}: score {g_scores[b, j]:.9g}, reference {s:.9g}")
            assert int(g_states[b, j]) == v, f"request {b}, beam {j}: state {g_states[b, j]} != {v}"
            w = c_scores[j]
            assert abs(float(g_scores[b, j]) - w) <= tol(w), (
                f"request {b}, position {j}: score {g_scores[b, j]:.9g}, reference {w:.9g}")
            separated = (j == 0 or c_scores[j - 1] - w > 2 * tol(w)) and (
                j + 1 >= len(cands) or w - c_scores[j + 1] > 2 * tol(w))
            if separated:
                want = (int(every[1][b][j]), int(every[2][b][j]))
                assert key == want, f"request {b}, position {j}: {key}, reference {want}"
        if nv:
            cut = c_scores[nv - 1]
            must = {key for key, (s, _) in cands.items() if s > cut + 2 * tol(cut)}
            missing = must - set(keys)
            assert not missing, f"request {b}: clear winners {sorted(missing)} are missing"


def capture_cuda_graph(fn, *, repeat: int = 1, warmup: int = 1):
    """Capture ``repeat`` back-to-back calls of ``fn()`` in one CUDA graph, after ``warmup``
    calls on a side stream (where Triton compiles and allocators settle). Returns ``(replay,
    out)``: the graph's replay function and the last captured call's result, whose tensors the
    replays overwrite."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    out = None
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            out = fn()
    return graph.replay, out


@contextlib.contextmanager
def core_threads(n: int):
    """Run the block with the C++ core on ``n`` threads (restored afterwards, even on error)."""
    import sigma_fast as sf

    from . import _threads

    before, pinned = sf.get_num_threads(), _threads._pinned
    sf.set_num_threads(n)
    try:
        yield
    finally:
        sf.set_num_threads(before)
        _threads._pinned = pinned


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with torch's intra-op pool on ``n`` threads, not adapted to the free CPUs
    meanwhile (``sigma_fast._threads``); both restored afterwards."""
    from . import _threads

    before, pinned = torch.get_num_threads(), _threads._pinned
    torch.set_num_threads(n)
    _threads._pinned = True
    try:
        yield
    finally:
        torch.set_num_threads(before)
        _threads._pinned = pinned


def dict_trie_prefix_fn(codes, vocab):
    """``prefix_allowed_tokens_fn`` for ``model.generate`` over the semantic IDs ``codes``
    ([N, L] rows) placed in the vocabulary by ``vocab`` (a ``SIDVocab``), from a plain Python
    dict trie: the way a user of transformers constrains generation without sigma_fast (the
    baseline of the benchmarks). ``sent`` holds the generated tokens only (``inputs_embeds``
    prompts)."""
    from collections import defaultdict

    rows = np.asarray(codes).tolist()
    tok = [list(range(o, o + vocab.codebook_size)) for o in vocab.token_offsets]
    nxt = defaultdict(set)
    for row in rows:
        for lv in range(len(row)):
            nxt[tuple(row[:lv])].add(tok[lv][row[lv]])
    nxt = {k: sorted(v) for k, v in nxt.items()}
    back = [{t: c for c, t in enumerate(level)} for level in tok]

    def fn(batch_id, sent):
        return nxt.get(tuple(back[i][t] for i, t in enumerate(sent.tolist())), [])

    return fn
