"""Helpers for testing code that uses sigma_fast (and for sigma_fast's own tests)."""

from __future__ import annotations

import numpy as np
import torch

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
