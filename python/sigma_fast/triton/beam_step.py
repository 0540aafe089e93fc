"""Trie-constrained beam step in Triton: ``constrained_beam_step``.

Semantics are those of ``sigma_fast.reference.beam_step`` (DESIGN.md section 3); the structure is
that of the CUDA twin (``cuda/beam_step.cu``): one program per request, one launch per step,
no host synchronisation.

1. Beams in chunks of BLOCK_W: check the beam score, the state, the logits row (NaN / +inf)
   and the node's CSR range; log-sum-exp in float32 (max, then sum of exp(x - max), then
   max + log(sum): over the whole row, over the allowed children, or none). The first failing
   beam (in beam order) is recorded.
2. Every candidate is scored once into a workspace of [W_end, SPAN] cells (SPAN: the most
   children of a beam that passes the checks, W_end: one past the last such beam; found by a
   first pass over the beams' states): cell (w, j) holds the score of slot
   ``child_offsets[state_w] + j`` (-inf when j is past the node's children, the child is not
   allowed or the score is -inf). Tokens ascend within a node, so the flat cell index
   w * SPAN + j orders candidates by (parent, token).
3. Exact selection of the W best by (score descending, cell index ascending): a radix select
   (4 passes of 8-bit histograms) over the integer order key of the scores finds the W-th best
   key T; every candidate better than T is kept, and of those equal to T the first ones in
   cell order (a running cumsum).
4. The kept candidates (<= W) are placed by rank (how many kept candidates rank before each),
   advanced to their child node; the rest is padding (-inf, -1, -1, -1). A request with an
   input error gets NaN scores and -1 everywhere instead.

Every reduction has a fixed shape and order, so results are deterministic. Per-request status
(code, beam) goes to an int32 [B, 2] tensor with the codes of ``csrc/beam_step.h``; the
caller (``sigma_fast.beam_step``) decides whether to read it (a sync) and raise.

Inputs are validated by ``sigma_fast.beam_step``: float32 logits with unit stride in the last
dimension, contiguous float32 beam scores and int64 states, the trie's int64 CSR arrays and an
optional bool [1 or B, num_nodes] mask, all on one device (CUDA, or CPU under
``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# Status codes (csrc/beam_step.h: BeamStepStatus).
_OK, _EMPTY, _BAD_SCORE, _BAD_STATE, _BAD_LOGIT, _BAD_TRIE = (tl.constexpr(c) for c in range(6))


@triton.jit
def _desc_key(s):
    """Integer key in [0, 2^32) of a float32 score for "score descending" (smaller key =
    better); -0 and +0 share a key, as they compare equal."""
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    asc = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) + 2**31  # [0, 2^32)
    return (2**32 - 1) - asc


@triton.jit
def _beam_step_kernel(
    logits_ptr, ld_b, ld_w, bs_ptr, st_ptr,
    co_ptr, ct_ptr, cn_ptr, al_ptr, ld_al,
    out_s_ptr, out_p_ptr, out_t_ptr, out_n_ptr, status_ptr,
    cand_ptr, lo_ptr, sel_s_ptr, sel_i_ptr,
    W_IN, K, W, NUM_NODES, SLOTS,
    HAS_ALLOWED: tl.constexpr, NORM: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_OUT: tl.constexpr, BLOCK_J: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    zero = b * 0  # int64 scalar: loop-carried values keep one type
    NEG = float("-inf")
    INF = float("inf")
    cand_row = cand_ptr + b * (W_IN * K)
    al_row = al_ptr + b * ld_al
    err_beam = zero + W_IN  # first failing beam; W_IN = none
    err_code = zero

    # ---- 0. the workspace's extent: SPAN = the most children of a beam that passes the score,
    # state and range checks of 1. (cells w * SPAN + j, j < SPAN, still order candidates by
    # (parent, token)), and only beams before the last such beam hold cells. A deep step (a
    # few children per beam) or a root step (one live beam) then selects over a few hundred
    # cells instead of W_IN * K.
    span_v = tl.zeros((BLOCK_W,), tl.int64)
    end_v = tl.zeros((BLOCK_W,), tl.int64)
    for w0 in range(0, W_IN, BLOCK_W):
        ws = w0 + tl.arange(0, BLOCK_W).to(tl.int64)
        wm = ws < W_IN
        bs = tl.load(bs_ptr + b * W_IN + ws, mask=wm, other=NEG)
        live = wm & (bs != NEG) & (bs < INF)
        st = tl.load(st_ptr + b * W_IN + ws, mask=live, other=0)
        live = live & (st >= 0) & (st < NUM_NODES)
        st = tl.where(live, st, 0)
        lo = tl.load(co_ptr + st, mask=live, other=0)
        hi = tl.load(co_ptr + st + 1, mask=live, other=0)
        cnt = hi - lo
        sane = live & (lo >= 0) & (cnt > 0) & (hi <= SLOTS) & (cnt <= K)
        span_v = tl.maximum(span_v, tl.where(sane, cnt, 0))
        end_v = tl.maximum(end_v, tl.where(sane, ws + 1, 0))
    SPAN = tl.maximum(tl.max(span_v, axis=0), 1)
    n_cells = tl.max(end_v, axis=0) * SPAN

    # ---- 1. beams: checks, log-sum-exp, candidate scores into the workspace
    for w0 in range(0, W_IN, BLOCK_W):
        ws = w0 + tl.arange(0, BLOCK_W).to(tl.int64)
        wm = ws < W_IN
        bs = tl.load(bs_ptr + b * W_IN + ws, mask=wm, other=NEG)
        live = wm & (bs != NEG)
        bad_score = live & ~(bs < INF)
        st = tl.load(st_ptr + b * W_IN + ws, mask=live, other=0)
        bad_state = live & ~bad_score & ((st < 0) | (st >= NUM_NODES))
        ok = live & ~bad_score & ~bad_state
        st = tl.where(ok, st, 0)
        row = logits_ptr + b * ld_b + ws * ld_w

        m = tl.full((BLOCK_W,), NEG, tl.float32)
        n_bad = tl.zeros((BLOCK_W,), tl.int32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(row[:, None] + ks[None, :], mask=ok[:, None] & (ks < K)[None, :],
                        other=NEG)
            n_bad += tl.sum(tl.where(x < INF, 0, 1), axis=1)
            m = tl.maximum(m, tl.max(tl.where(x < INF, x, NEG), axis=1))
        bad_logit = ok & (n_bad > 0)
        ok = ok & ~bad_logit

        lo = tl.load(co_ptr + st, mask=ok, other=0)
        hi = tl.load(co_ptr + st + 1, mask=ok, other=0)
        cnt = hi - lo
        bad_trie = ok & ((lo < 0) | (cnt < 0) | (hi > SLOTS) | (cnt > K))
        ok = ok & ~bad_trie
        cnt = tl.where(ok, cnt, 0)

        # Children: corrupt entries, and the maximum over the allowed ones ("valid"). Both are
        # accumulated elementwise and reduced after the loop: Triton 3.6's GPU pipeline
        # (TritonGPUOptimizeThreadLocality) crashed on these reductions inside the loop.
        corrupt2 = tl.zeros((BLOCK_W, BLOCK_K), tl.int32)
        vmax2 = tl.full((BLOCK_W, BLOCK_K), NEG, tl.float32)
        for j0 in range(0, SPAN, BLOCK_K):
            js = j0 + tl.arange(0, BLOCK_K)
            cm = ok[:, None] & (js[None, :] < cnt[:, None])
            e = lo[:, None] + js[None, :]
            tok = tl.load(ct_ptr + e, mask=cm, other=0)
            node = tl.load(cn_ptr + e, mask=cm, other=0)
            sane = (tok >= 0) & (tok < K) & (node >= 0) & (node < NUM_NODES)
            corrupt2 += tl.where(cm & ~sane, 1, 0)
            if NORM == 1:
                use = cm & sane
                if HAS_ALLOWED:
                    use = use & (tl.load(al_row + node, mask=use, other=0) != 0)
                x = tl.load(row[:, None] + tok, mask=use, other=NEG)
                vmax2 = tl.maximum(vmax2, x)
        n_corrupt = tl.sum(corrupt2, axis=1)
        vmax = tl.max(vmax2, axis=1)
        bad_trie = bad_trie | (ok & (n_corrupt > 0))
        ok = ok & (n_corrupt == 0)

        if NORM == 0:  # log-sum-exp over the whole row
            mm = tl.where(m > NEG, m, 0.0)
            total = tl.zeros((BLOCK_W,), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(row[:, None] + ks[None, :], mask=ok[:, None] & (ks < K)[None, :],
                            other=NEG)
                total += tl.sum(tl.exp(x - mm[:, None]), axis=1)
            has = ok & (m > NEG)
            lse = tl.where(has, m + tl.log(tl.where(has, total, 1.0)), NEG)
        elif NORM == 1:  # over the allowed children
            mv = tl.where(vmax > NEG, vmax, 0.0)
            total = tl.zeros((BLOCK_W,), tl.float32)
            for j0 in range(0, SPAN, BLOCK_K):
                js = j0 + tl.arange(0, BLOCK_K)
                use = ok[:, None] & (js[None, :] < cnt[:, None])
                e = lo[:, None] + js[None, :]
                tok = tl.load(ct_ptr + e, mask=use, other=0)
                if HAS_ALLOWED:
                    node = tl.load(cn_ptr + e, mask=use, other=0)
                    use = use & (tl.load(al_row + node, mask=use, other=0) != 0)
                x = tl.load(row[:, None] + tok, mask=use, other=NEG)
                total += tl.sum(tl.exp(x - mv[:, None]), axis=1)
            has = ok & (vmax > NEG)
            lse = tl.where(has, vmax + tl.log(tl.where(has, total, 1.0)), NEG)
        else:
            lse = tl.zeros((BLOCK_W,), tl.float32)
        ok = ok & (lse > NEG)  # every relevant logit is -inf: no finite candidate
        lse = tl.where(ok, lse, 0.0)
        bs = tl.where(ok, bs, 0.0)  # (NaN / inf scores of failing beams stay out of the math)

        tl.store(lo_ptr + b * W_IN + ws, lo, mask=wm)
        for j0 in range(0, SPAN, BLOCK_K):
            js = j0 + tl.arange(0, BLOCK_K)
            use = ok[:, None] & (js[None, :] < cnt[:, None])
            e = lo[:, None] + js[None, :]
            tok = tl.load(ct_ptr + e, mask=use, other=0)
            if HAS_ALLOWED:
                node = tl.load(cn_ptr + e, mask=use, other=0)
                use = use & (tl.load(al_row + node, mask=use, other=0) != 0)
            x = tl.load(row[:, None] + tok, mask=use, other=NEG)
            if NORM == 2:
                score = bs[:, None] + x
            else:
                score = bs[:, None] + (x - lse[:, None])
            score = tl.where(use, score, NEG)
            tl.store(cand_row + ws[:, None] * SPAN + js[None, :], score,
                     mask=wm[:, None] & (js < SPAN)[None, :])

        code = tl.where(bad_score, _BAD_SCORE, tl.where(bad_state, _BAD_STATE, tl.where(
            bad_logit, _BAD_LOGIT, tl.where(bad_trie, _BAD_TRIE, 0))))
        first = tl.min(tl.where(code != 0, ws, W_IN), axis=0)
        first_code = tl.sum(tl.where(ws == first, code, 0), axis=0).to(tl.int64)
        new = (err_beam == W_IN) & (first < W_IN)
        err_code = tl.where(new, first_code, err_code)
        err_beam = tl.where(new, first, err_beam)
    has_err = err_beam < W_IN
    tl.debug_barrier()  # the workspace is read below in another layout

    # ---- 2. radix select (4 passes of 8 bits) of the target-th smallest key, target =
    # min(W, number of valid candidates); `need` ends as the number of candidates with that key
    # to keep.
    bins = tl.arange(0, 256)
    thr = zero
    need = zero
    target = zero
    for p in tl.static_range(4):
        shift = 24 - 8 * p
        hist = tl.zeros((256,), tl.int32)
        for c0 in range(0, n_cells, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            s = tl.load(cand_row + cs, mask=cs < n_cells, other=NEG)
            key = _desc_key(s)
            match = (s > NEG) & ((key >> (shift + 8)) == (thr >> (shift + 8)))
            hist += tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=match)
        if p == 0:
            target = tl.where(has_err, 0, tl.minimum(tl.sum(hist, axis=0).to(tl.int64), W))
            need = target
        cum = tl.cumsum(hist, axis=0).to(tl.int64)
        digit = tl.sum((cum < need).to(tl.int64), axis=0)  # the first bin reaching `need`
        need -= tl.sum(tl.where(bins < digit, hist, 0).to(tl.int64), axis=0)
        thr = thr | (digit << shift)
    # No candidate to keep (target 0): a threshold below every key keeps none.
    thr = tl.where(target > 0, thr, -1)
    need_eq = need

    # ---- 3. keep the candidates better than thr and the first need_eq equal to it
    eq_seen = zero
    kept = zero
    for c0 in range(0, n_cells, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        s = tl.load(cand_row + cs, mask=cs < n_cells, other=NEG)
        valid = s > NEG
        key = _desc_key(s)
        lt = (valid & (key < thr)).to(tl.int64)
        eq = (valid & (key == thr)).to(tl.int64)
        eq_rank = eq_seen + tl.cumsum(eq, axis=0) - eq
        take = lt | (eq & (eq_rank < need_eq).to(tl.int64))
        pos = kept + tl.cumsum(take, axis=0) - take
        tl.store(sel_s_ptr + b * W + pos, s, mask=take != 0)
        tl.store(sel_i_ptr + b * W + pos, cs.to(tl.int64), mask=take != 0)
        eq_seen += tl.sum(eq, axis=0)
        kept += tl.sum(take, axis=0)
    tl.debug_barrier()

    # ---- 4. place by rank, advance, pad
    offs = tl.arange(0, BLOCK_OUT).to(tl.int64)
    om = offs < kept
    si = tl.load(sel_s_ptr + b * W + offs, mask=om, other=NEG)
    ci = tl.load(sel_i_ptr + b * W + offs, mask=om, other=0)
    rank = tl.zeros((BLOCK_OUT,), tl.int64)
    for j0 in range(0, BLOCK_OUT, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        jm = js < kept
        sj = tl.load(sel_s_ptr + b * W + js, mask=jm, other=NEG)
        cj = tl.load(sel_i_ptr + b * W + js, mask=jm, other=0)
        before = jm[:, None] & ((sj[:, None] > si[None, :]) |
                                ((sj[:, None] == si[None, :]) & (cj[:, None] < ci[None, :])))
        rank += tl.sum(before.to(tl.int64), axis=0)
    parent = ci // SPAN
    slot = tl.load(lo_ptr + b * W_IN + parent, mask=om, other=0) + (ci - parent * SPAN)
    token = tl.load(ct_ptr + slot, mask=om, other=-1)
    node = tl.load(cn_ptr + slot, mask=om, other=-1)
    out = b * W + rank
    tl.store(out_s_ptr + out, si, mask=om)
    tl.store(out_p_ptr + out, parent, mask=om)
    tl.store(out_t_ptr + out, token, mask=om)
    tl.store(out_n_ptr + out, node, mask=om)
    pad = (offs >= kept) & (offs < W)
    pad_score = tl.where(has_err, float("nan"), NEG)
    tl.store(out_s_ptr + b * W + offs, tl.zeros((BLOCK_OUT,), tl.float32) + pad_score, mask=pad)
    minus_one = tl.full((BLOCK_OUT,), -1, tl.int64)
    tl.store(out_p_ptr + b * W + offs, minus_one, mask=pad)
    tl.store(out_t_ptr + b * W + offs, minus_one, mask=pad)
    tl.store(out_n_ptr + b * W + offs, minus_one, mask=pad)
    status = tl.where(has_err, err_code, tl.where(kept == 0, _EMPTY, _OK))
    tl.store(status_ptr + 2 * b, status.to(tl.int32))
    tl.store(status_ptr + 2 * b + 1, tl.where(has_err, err_beam, -1).to(tl.int32))


# Candidate tiles are at least one element per thread of the launch (4 warps): the histogram
# of a tile smaller than the launch would hold replicated elements.
_MIN_BLOCK_C = 128


def _pow2(n: int, cap: int | None = None) -> int:
    p = triton.next_power_of_2(max(1, int(n)))
    return p if cap is None else min(p, cap)


def constrained_beam_step(logits, beam_scores, states, child_offsets, child_tokens, child_nodes,
                          allowed, beam_width: int, normalize: int):
    """One fused step (see the module docstring). ``normalize``: 0 full, 1 valid, 2 none;
    ``allowed``: None or bool [1 or B, num_nodes]. Returns ``((scores, parent, token, states),
    status)``; status is int32 [B, 2] (code, beam), read by the caller only when it raises."""
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    beam_scores, states = beam_scores.contiguous(), states.contiguous()
    batch, w_in, k = logits.shape
    dev = logits.device
    scores = torch.empty((batch, beam_width), dtype=torch.float32, device=dev)
    parent, token, nxt = (torch.empty((batch, beam_width), dtype=torch.int64, device=dev)
                          for _ in range(3))
    status = torch.empty((batch, 2), dtype=torch.int32, device=dev)
    if batch == 0:
        return (scores, parent, token, nxt), status
    if allowed is not None:
        if allowed.shape[-1] > 1 and allowed.stride(-1) != 1:
            allowed = allowed.contiguous()
        ld_al = allowed.stride(0) if allowed.shape[0] > 1 else 0
        al = allowed.view(torch.uint8)
    else:
        ld_al, al = 0, child_offsets  # never read
    cand = torch.empty((batch, max(1, w_in * k)), dtype=torch.float32, device=dev)
    lo = torch.empty((batch, max(1, w_in)), dtype=torch.int64, device=dev)
    sel_s = torch.empty((batch, beam_width), dtype=torch.float32, device=dev)
    sel_i = torch.empty((batch, beam_width), dtype=torch.int64, device=dev)
    block_out = _pow2(beam_width)
    ctx = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with ctx:
        _beam_step_kernel[(batch,)](
            logits, logits.stride(0), logits.stride(1), beam_scores, states,
            child_offsets, child_tokens, child_nodes, al, ld_al,
            scores, parent, token, nxt, status,
            cand, lo, sel_s, sel_i,
            w_in, k, beam_width, child_offsets.shape[0] - 1, child_tokens.shape[0],
            HAS_ALLOWED=allowed is not None, NORM=int(normalize),
            BLOCK_W=_pow2(w_in, 16), BLOCK_K=_pow2(k, 128),
            BLOCK_C=max(_MIN_BLOCK_C, _pow2(w_in * k, 1024)),
            BLOCK_OUT=block_out, BLOCK_J=min(block_out, 64),
        )
    return (scores, parent, token, nxt), status
