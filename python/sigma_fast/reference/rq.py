"""Reference residual quantization (NumPy).

Storage mirrors the kernels: residuals are float32 and updated by float32 subtraction.
Distances are evaluated in float64 from those float32 residuals, in the kernels' form
||r||^2 - 2<r, c> + ||c||^2 (with the constant ||r||^2 of a single beam dropped, as the kernels'
greedy search drops it): subtracting r - c first would lose c entirely once |r| exceeds |c| by
2^53 (inputs scaled by 1e18 against unit codewords all tied to code 0), while <r, c> keeps it.
So the reference is the "exact" answer the fast backends approximate; they may disagree only on
near-ties (see ``sigma_fast.testing.assert_rq_codes_close``).
"""

from __future__ import annotations

import numpy as np


def _sq_norm(v: np.ndarray) -> np.ndarray:
    v64 = v.astype(np.float64)
    return (v64 * v64).sum(axis=-1)


def rq_encode(x: np.ndarray, codebooks: np.ndarray, *, beam_width: int = 1,
              margins: np.ndarray | None = None):
    """Encode rows of ``x`` [N, D] with ``codebooks`` [L, K, D].

    Returns ``(codes, err)``: codes int64 [N, L]; err float32 [N], the squared norm of each
    row's final residual.

    Greedy (beam_width == 1)::

        r = x
        for l in range(L):
            k = argmin_k ||r - C[l, k]||^2      # ties: smaller k
            r = r - C[l, k]

    Beam B: keep the B partial codes with the smallest ||r||^2 after each level (ties: the
    lexicographically smaller code tuple); the answer is the best final one.

    ``margins`` (optional float64 [N] output) receives, per row, the smallest gap between the
    last kept and the first dropped candidate error over all levels, and between the best and
    second-best final candidate: a row whose margin exceeds float32 rounding has one right
    answer that every backend must return exactly.
    """
    x = np.asarray(x, dtype=np.float32)
    codebooks = np.asarray(codebooks, dtype=np.float32)
    n = x.shape[0]
    levels, k, _ = codebooks.shape
    cb64 = codebooks.astype(np.float64)
    cnorm = (cb64 * cb64).sum(axis=-1)  # [L, K]
    codes = np.zeros((n, levels), dtype=np.int64)
    err = np.zeros((n,), dtype=np.float32)
    for i in range(n):
        # beams: list of (code tuple, float32 residual), sorted best first
        beams: list[tuple[tuple[int, ...], np.ndarray]] = [((), x[i].copy())]
        margin = np.inf
        for level in range(levels):
            cand_err = []
            cand_codes = []
            cand_parent = []
            # Each beam's ||r||^2 relative to the smallest one (exactly 0 for a single beam).
            rnorm = [_sq_norm(r) for _, r in beams]
            base = min(rnorm)
            for b, (prefix, r) in enumerate(beams):
                dist = (rnorm[b] - base) + cnorm[level] - 2.0 * (cb64[level] @ r.astype(np.float64))
                for j in range(k):
                    cand_err.append(dist[j])
                    cand_codes.append(prefix + (j,))
                    cand_parent.append(b)
            order = sorted(range(len(cand_err)), key=lambda c: (cand_err[c], cand_codes[c]))
            keep = min(beam_width, len(order))
            if keep < len(order):
                margin = min(margin, cand_err[order[keep]] - cand_err[order[keep - 1]])
            if level == levels - 1 and len(order) > 1:
                margin = min(margin, cand_err[order[1]] - cand_err[order[0]])
            order = order[:keep]
            beams = [
                (
                    cand_codes[c],
                    (beams[cand_parent[c]][1] - codebooks[level, cand_codes[c][-1]]).astype(
                        np.float32
                    ),
                )
                for c in order
            ]
        best_codes, best_res = beams[0]
        codes[i] = best_codes
        if margins is not None:
            margins[i] = margin
        err[i] = np.float32(_sq_norm(best_res))
    return codes, err


def rq_decode(codes: np.ndarray, codebooks: np.ndarray, *, levels: int | None = None):
    """Sum the codewords of the first ``levels`` levels (default: all) in level order, in
    float32: ``out = C[0, codes[:, 0]] + C[1, codes[:, 1]] + ...``."""
    codes = np.asarray(codes)
    codebooks = np.asarray(codebooks, dtype=np.float32)
    n = codes.shape[0]
    num = codes.shape[1] if levels is None else levels
    out = np.zeros((n, codebooks.shape[2]), dtype=np.float32)
    for level in range(num):
        out = out + codebooks[level, codes[:, level]]
    return out
