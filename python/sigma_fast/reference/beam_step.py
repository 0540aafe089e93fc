"""Reference constrained beam step (plain Python loop = the specification, DESIGN.md section 3).

Precision mirrors the kernels: the log-sum-exp is evaluated in float64 and rounded to float32;
``log_prob = logit - lse`` and ``score = beam_score + log_prob`` are float32 operations. With
``normalize="none"`` every backend therefore agrees bitwise; otherwise the backends' float32
log-sum-exp may differ from this one by a few ulp (see
``sigma_fast.testing.assert_beam_step_close``).
"""

from __future__ import annotations

import math

import numpy as np

NORMALIZE = ("full", "valid", "none")
ON_EMPTY = ("error", "pad")


def _log_sum_exp(values) -> np.float32:
    values = [float(v) for v in values]
    m = max(values, default=-math.inf)
    if m == -math.inf:
        return np.float32(-np.inf)
    return np.float32(m + math.log(sum(math.exp(v - m) for v in values)))


def _trie_arrays(trie):
    """(child_offsets, child_tokens, child_nodes) as NumPy arrays, from a ``PrefixTrie`` or from
    the dict ``build_trie`` returns."""
    get = trie.__getitem__ if isinstance(trie, dict) else lambda name: getattr(trie, name)
    out = []
    for name in ("child_offsets", "child_tokens", "child_nodes"):
        a = get(name)
        out.append(a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a))
    return out


def constrained_beam_step(logits, beam_scores, states, trie, *, beam_width: int, allowed=None,
                          normalize: str = "full", on_empty: str = "error"):
    """One step of trie-constrained beam search.

    Args:
        logits: float32 [B, W_in, K], the next-token logits of each input beam over the K codes.
        beam_scores: float32 [B, W_in]; -inf marks a padding beam (no candidates).
        states: int64 [B, W_in], the trie node of each beam (ignored for padding beams).
        trie: a ``PrefixTrie``, or the dict of arrays ``build_trie`` returns (its CSR child
            lists child_offsets, child_tokens, child_nodes are used).
        allowed: None, bool [num_nodes] (shared) or [B, num_nodes] (per request).
        normalize: "full" (log-softmax over all K), "valid" (over the beam's valid children)
            or "none" (logits are already log-probabilities).
        on_empty: "error" (ValueError naming the request) or "pad" when a request has no
            candidate.

    Returns ``(scores float32, parent int64, token int64, next_states int64)``, each [B, W]::

        for b in range(B):
            candidates = []
            for w in range(W_in):
                if beam_scores[b, w] == -inf: continue                  # padding beam
                for (token, child) in children(states[b, w]):           # ascending tokens
                    if allowed is not None and not allowed[b][child]: continue
                    lp = logits[b, w, token] - lse   # lse over all K / the valid children / 0
                    score = beam_scores[b, w] + lp
                    if score > -inf: candidates.append((score, w, token, child))
            keep the W best by (score descending, parent ascending, token ascending);
            pad with (-inf, -1, -1, -1)

    NaN or +inf logits in a live beam's row raise ValueError, as do NaN / +inf beam scores.
    """
    child_offsets, child_tokens, child_nodes = _trie_arrays(trie)
    logits = np.asarray(logits, dtype=np.float32)
    beam_scores = np.asarray(beam_scores, dtype=np.float32)
    states = np.asarray(states, dtype=np.int64)
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}; got {normalize!r}")
    if on_empty not in ON_EMPTY:
        raise ValueError(f"on_empty must be one of {ON_EMPTY}; got {on_empty!r}")
    batch, beams_in, k = logits.shape
    num_nodes = len(child_offsets) - 1
    if allowed is not None:
        allowed = np.asarray(allowed, dtype=bool)
        if allowed.ndim == 1:
            allowed = np.broadcast_to(allowed, (batch, allowed.shape[0]))
    scores = np.full((batch, beam_width), -np.inf, dtype=np.float32)
    parent = np.full((batch, beam_width), -1, dtype=np.int64)
    token = np.full((batch, beam_width), -1, dtype=np.int64)
    next_states = np.full((batch, beam_width), -1, dtype=np.int64)
    for b in range(batch):
        candidates = []
        for w in range(beams_in):
            bs = beam_scores[b, w]
            if bs == -np.inf:
                continue
            if not np.isfinite(bs):
                raise ValueError(f"beam_scores must be finite or -inf (padding); got {bs} at "
                                 f"request {b}, beam {w}")
            s = int(states[b, w])
            if not 0 <= s < num_nodes:
                raise IndexError(f"states must lie in [0, {num_nodes}) for non-padding beams; "
                                 f"got {s} at request {b}, beam {w}")
            row = logits[b, w]
            bad = np.nonzero(~(row < np.inf))[0]
            if len(bad):
                raise ValueError(f"logits must not be NaN or +inf; got {row[bad[0]]} at request "
                                 f"{b}, beam {w}, index {bad[0]}")
            children = []
            for e in range(child_offsets[s], child_offsets[s + 1]):
                child, tok = int(child_nodes[e]), int(child_tokens[e])
                if not 0 <= tok < k:
                    raise IndexError(f"trie token {tok} (child of node {s}) is outside the "
                                     f"logits' range [0, {k}) at request {b}, beam {w}")
                if allowed is None or allowed[b, child]:
                    children.append((tok, child))
            if normalize == "full":
                lse = _log_sum_exp(row)
            elif normalize == "valid":
                lse = _log_sum_exp(row[tok] for tok, _ in children)
            else:
                lse = None
            if lse == -np.inf:
                continue  # every logit is -inf: no finite candidate
            for tok, child in children:
                lp = row[tok] if lse is None else row[tok] - lse  # float32
                score = bs + lp  # float32
                if score > -np.inf:
                    candidates.append((score, w, tok, child))
        if not candidates and on_empty == "error":
            raise ValueError(
                f"request {b} has no valid continuation: no live beam has a child in the trie "
                f"that is allowed and has a finite score (pass on_empty='pad' to get padding "
                f"beams instead)")
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        for j, (score, w, tok, child) in enumerate(candidates[:beam_width]):
            scores[b, j], parent[b, j], token[b, j], next_states[b, j] = score, w, tok, child
    return scores, parent, token, next_states
