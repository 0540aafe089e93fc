"""Adaptive probabilistic fusion in Triton: ``apf_fuse``.

Semantics are those of ``sigma_fast.reference.apf_fuse``; precision mirrors the cpu/cuda
twins: similarities in fp32 (queries normalised in fp64 then rounded to fp32, as the index
rows are), temperatures, logsumexps and log P in fp64, log P rounded to fp32 on output.

Two kernels:

* ``_apf_scan_kernel``, one program per beam (b, k): walks the beam's bucket in tiles of
  BLOCK_R rows, scores a tile as a broadcast multiply + row sum (fp32, no TF32), pins the
  tile's similarities through a per-program scratch row, and merges the tile's allowed rows
  into a running top-M held in registers. The merge is by rank: a tile row's position in the
  merged list is its rank in the tile plus the number of better list entries, a list entry's
  is its index plus the number of better tile rows (order: sim descending, then item id; total,
  as ids are unique in a bucket), and the new list gathers each position's one match. With
  normalize="bucket" it also keeps an online logsumexp of t_b * s over every allowed row.
  Writes the list (and the optional per-bucket outputs).
* ``_apf_fuse_kernel``, one program per request: the per-beam softmax over the kept M (or the
  bucket's logsumexp), then the global top N by repeated extraction with composite keys
  (max log P, then min item id, then min beam); with dedup an extracted item's other
  occurrences (always worse: it was the best live one) leave the pool with it.

The temperatures t_b are computed with torch ops on the device (fp64, no host sync). Inputs
are validated by ``sigma_fast.apf``; these functions assume tensors on one device (CUDA, or
CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# Largest top_m (padded to a power of two) the register-resident merge supports: it builds
# [BLOCK_M, BLOCK_M] selection masks.
MAX_TOP_M = 256
# Rows per scan tile (a power of two); None picks by D and top_m. Tests set a small value so
# that small buckets span several tiles and exercise the merge.
SCAN_ROWS: int | None = None


@triton.jit
def _apf_scan_kernel(
    phi_ptr, pids_ptr, q_ptr, temp_ptr,
    emb_ptr, off_ptr, ids_ptr,
    mask_ptr, mask_ld, mask_len,
    list_sim_ptr, list_id_ptr, count_ptr, lse_ptr,
    bids_ptr, bsims_ptr, tile_ptr,
    K, D, U, M,
    HAS_MASK: tl.constexpr, BUCKET_NORM: tl.constexpr, RETURN_BUCKETS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)
    b = pair // K
    score = tl.load(phi_ptr + pair)
    u = tl.load(pids_ptr + pair)
    active = (score != float("-inf")) & (u >= 0) & (u < U)
    u_safe = tl.where(active, u, 0)
    r0 = tl.load(off_ptr + u_safe)
    r1 = tl.load(off_ptr + u_safe + 1)
    r1 = tl.where(active, r1, r0)  # skipped beam: no rows

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(q_ptr + pair * D + offs_d, mask=d_mask, other=0.0).to(tl.float64)
    norm = tl.sqrt(tl.sum(q * q, axis=0))
    norm = tl.where(norm > 0, norm, 1.0)  # a skipped beam's query may be zero
    qn = (q / norm).to(tl.float32)
    t = tl.load(temp_ptr + b)

    offs_r = tl.arange(0, BLOCK_R)
    offs_m = tl.arange(0, BLOCK_M)
    ls = tl.full([BLOCK_M], float("-inf"), tl.float32)
    li = tl.full([BLOCK_M], -1, tl.int64)
    count = r0 * 0  # int64 0: entries kept
    lmx = t * 0.0 - float("inf")  # fp64 online logsumexp of t * s
    lsum = t * 0.0
    for t0 in range(r0, r1, BLOCK_R):
        rows = t0 + offs_r
        valid = rows < r1
        ids = tl.load(ids_ptr + rows, mask=valid, other=0)
        if HAS_MASK:
            inside = valid & (ids >= 0) & (ids < mask_len)
            ok = tl.load(mask_ptr + b * mask_ld + ids, mask=inside, other=0)
            valid = inside & (ok != 0)
        e = tl.load(emb_ptr + rows[:, None] * D + offs_d[None, :],
                    mask=valid[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        s = tl.sum(e * qn[None, :], axis=1)  # [BLOCK_R] fp32
        # The merge compares every row's similarity with every other's in two layouts; a round
        # trip through the program's scratch row pins one value per row. Without it the
        # compiled kernel (H200, 64-row tiles) lost list entries: a reduction recomputed in
        # another layout may round differently, and a row that beats itself breaks the ranks.
        tile = tile_ptr + pair * BLOCK_R + offs_r
        tl.debug_barrier()  # the previous tile's reads are done
        tl.store(tile, s)
        tl.debug_barrier()
        s = tl.load(tile)
        if BUCKET_NORM:
            x = t * s.to(tl.float64)
            new_mx = tl.maximum(lmx, tl.max(tl.where(valid, x, float("-inf")), axis=0))
            safe = tl.where(new_mx == float("-inf"), 0.0, new_mx)
            lsum = lsum * tl.exp(lmx - safe) + tl.sum(
                tl.where(valid, tl.exp(tl.where(valid, x, safe) - safe), 0.0), axis=0)
            lmx = new_mx

        # Merge by rank. better(a, b): a.sim > b.sim, or equal sims and a.id < b.id.
        lv = offs_m < count
        s_o, i_o = s[:, None], ids[:, None]  # [R, 1]: the "other" tile row
        s_e, i_e = s[None, :], ids[None, :]  # [1, R]: the element
        tile_better = valid[:, None] & ((s_o > s_e) | ((s_o == s_e) & (i_o < i_e)))
        rank_t = tl.sum(tile_better.to(tl.int32), axis=0)  # [R]
        list_better = lv[:, None] & ((ls[:, None] > s_e) | ((ls[:, None] == s_e) &
                                                            (li[:, None] < i_e)))  # [M, R]
        pos_t = rank_t + tl.sum(list_better.to(tl.int32), axis=0)  # [R]
        row_better = valid[None, :] & ((s_e > ls[:, None]) | ((s_e == ls[:, None]) &
                                                            (i_e < li[:, None])))  # [M, R]
        pos_l = offs_m + tl.sum(row_better.to(tl.int32), axis=1)  # [M]
        hit_t = valid[None, :] & (pos_t[None, :] == offs_m[:, None])  # [M (position), R]
        hit_l = lv[None, :] & (pos_l[None, :] == offs_m[:, None])  # [M (position), M]
        new_s = tl.maximum(tl.max(tl.where(hit_t, s_e, float("-inf")), axis=1),
                           tl.max(tl.where(hit_l, ls[None, :], float("-inf")), axis=1))
        new_i = tl.maximum(tl.max(tl.where(hit_t, i_e, -1), axis=1),
                           tl.max(tl.where(hit_l, li[None, :], -1), axis=1))
        count = tl.minimum(count + tl.sum(valid.to(tl.int64), axis=0), M)
        keep = offs_m < count
        ls = tl.where(keep, new_s, float("-inf"))
        li = tl.where(keep, new_i, -1)

    m_mask = offs_m < M
    tl.store(list_sim_ptr + pair * M + offs_m, ls, mask=m_mask)
    tl.store(list_id_ptr + pair * M + offs_m, li, mask=m_mask)
    tl.store(count_ptr + pair, count)
    if BUCKET_NORM:
        tl.store(lse_ptr + pair,
                 tl.where(lsum > 0, lmx + tl.log(tl.where(lsum > 0, lsum, 1.0)), float("-inf")))
    if RETURN_BUCKETS:
        tl.store(bsims_ptr + pair * M + offs_m, ls, mask=m_mask)
        tl.store(bids_ptr + pair * M + offs_m, li, mask=m_mask)


@triton.jit
def _apf_fuse_kernel(
    phi_ptr, temp_ptr, list_sim_ptr, list_id_ptr, count_ptr, lse_ptr,
    out_ids_ptr, out_logp_ptr, out_src_ptr,
    K, M, N,
    BUCKET_NORM: tl.constexpr, DEDUP: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    k_ok = offs_k < K
    t = tl.load(temp_ptr + b)
    phi = tl.load(phi_ptr + b * K + offs_k, mask=k_ok, other=float("-inf")).to(tl.float64)
    cnt = tl.load(count_ptr + b * K + offs_k, mask=k_ok, other=0)
    valid = offs_m[None, :] < cnt[:, None]  # [BLOCK_K, BLOCK_M]: beam k's i-th best
    slot = (b * K + offs_k)[:, None] * M + offs_m[None, :]
    s = tl.load(list_sim_ptr + slot, mask=valid, other=0.0).to(tl.float64)
    ids = tl.load(list_id_ptr + slot, mask=valid, other=-1)
    kk = offs_k[:, None] + 0 * offs_m[None, :]
    x = t * s
    if BUCKET_NORM:
        lse = tl.load(lse_ptr + b * K + offs_k, mask=cnt > 0, other=0.0)
    else:
        mx = tl.max(tl.where(valid, x, float("-inf")), axis=1)  # the first, as t >= 0
        mx = tl.where(cnt > 0, mx, 0.0)
        terms = tl.where(valid, tl.exp(tl.where(valid, x, mx[:, None]) - mx[:, None]), 0.0)
        sums = tl.sum(terms, axis=1)
        lse = mx + tl.log(tl.where(sums > 0, sums, 1.0))
    logp = phi[:, None] + x - lse[:, None]
    live = valid
    big = 2**62
    for r in range(N):
        any_live = tl.max(tl.max(live.to(tl.int32), axis=1), axis=0) > 0
        best = tl.max(tl.max(tl.where(live, logp, float("-inf")), axis=1), axis=0)
        c1 = live & (logp == best)
        best_id = tl.min(tl.min(tl.where(c1, ids, big), axis=1), axis=0)
        c2 = c1 & (ids == best_id)
        best_k = tl.min(tl.min(tl.where(c2, kk, BLOCK_K), axis=1), axis=0)
        if DEDUP:
            live = live & (ids != best_id)
        else:
            live = live & ~(c2 & (kk == best_k))
        tl.store(out_ids_ptr + b * N + r, tl.where(any_live, best_id, -1))
        tl.store(out_logp_ptr + b * N + r,
                 tl.where(any_live, best, float("-inf")).to(tl.float32))
        tl.store(out_src_ptr + b * N + r, tl.where(any_live, best_k.to(tl.int64), -1))


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def temperatures(phi: torch.Tensor, *, tau: float, adaptive: bool,
                 sigma_min: float) -> torch.Tensor:
    """t_b (float64 [B], 0 for a request without a finite score), on phi's device."""
    fin = torch.isfinite(phi)
    n = fin.sum(dim=1)
    if not adaptive:
        return torch.where(n > 0, 1.0 / tau, 0.0).to(torch.float64)
    p64 = torch.where(fin, phi, 0.0).to(torch.float64)
    nd = n.clamp(min=1).to(torch.float64)
    mean = p64.sum(dim=1) / nd
    var = torch.where(fin, (p64 - mean[:, None]) ** 2, 0.0).sum(dim=1) / nd
    t = torch.clamp(var.sqrt(), min=sigma_min) / tau
    return torch.where(n > 0, t, 0.0)


def apf_fuse(phi, pids, q, emb, offsets, item_ids, allowed, top_m, top_n, tau, adaptive,
             sigma_min, normalize, dedup, return_buckets):
    """The ``sigma_fast.apf`` backend signature: validated tensors on one device (allowed:
    None or bool [1 or B, id_bound]); returns ``(ids, log_probs, sources, bucket_ids,
    bucket_sims)`` with M = 0 bucket columns unless return_buckets."""
    if top_m > MAX_TOP_M:
        raise NotImplementedError(
            f"the triton apf_fuse kernel supports top_m <= {MAX_TOP_M}; got top_m={top_m}: "
            f"use backend='cuda' or 'cpu'")
    dev = phi.device
    b, k = phi.shape
    d = emb.shape[1]
    mb = top_m if return_buckets else 0
    out_ids = torch.full((b, top_n), -1, dtype=torch.int64, device=dev)
    out_logp = torch.full((b, top_n), float("-inf"), dtype=torch.float32, device=dev)
    out_src = torch.full((b, top_n), -1, dtype=torch.int64, device=dev)
    b_ids = torch.full((b, k, mb), -1, dtype=torch.int64, device=dev)
    b_sims = torch.full((b, k, mb), float("-inf"), dtype=torch.float32, device=dev)
    if b == 0 or k == 0:
        return out_ids, out_logp, out_src, b_ids, b_sims
    phi = phi.contiguous()
    pids = pids.to(torch.int64).contiguous()
    q = q.contiguous()
    emb = emb.contiguous()
    pairs = b * k
    with _device_guard(phi):
        temp = temperatures(phi, tau=tau, adaptive=adaptive, sigma_min=sigma_min)
        list_sim = torch.empty((pairs, top_m), dtype=torch.float32, device=dev)
        list_id = torch.empty((pairs, top_m), dtype=torch.int64, device=dev)
        count = torch.empty((pairs,), dtype=torch.int64, device=dev)
        lse = torch.empty((pairs,), dtype=torch.float64, device=dev)
        if allowed is None:
            mask, mask_ld, mask_len = count, 0, 0  # never read
        else:
            mask = allowed.contiguous().view(torch.uint8)
            mask_ld = 0 if mask.shape[0] == 1 else mask.shape[1]
            mask_len = mask.shape[1]
        block_d = triton.next_power_of_2(d)
        block_m = triton.next_power_of_2(top_m)
        block_r = SCAN_ROWS or max(1, min(64, 4096 // block_d, 8192 // block_m))
        tile = torch.empty((pairs * block_r,), dtype=torch.float32, device=dev)
        _apf_scan_kernel[(pairs,)](
            phi, pids, q, temp, emb, offsets, item_ids, mask, mask_ld, mask_len,
            list_sim, list_id, count, lse, b_ids, b_sims, tile,
            k, d, offsets.shape[0] - 1, top_m,
            HAS_MASK=allowed is not None, BUCKET_NORM=normalize == "bucket",
            RETURN_BUCKETS=bool(return_buckets),
            BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_M=block_m, num_warps=4,
        )
        _apf_fuse_kernel[(b,)](
            phi, temp, list_sim, list_id, count, lse, out_ids, out_logp, out_src,
            k, top_m, top_n,
            BUCKET_NORM=normalize == "bucket", DEDUP=bool(dedup),
            BLOCK_K=triton.next_power_of_2(k), BLOCK_M=block_m, num_warps=4,
        )
    return out_ids, out_logp, out_src, b_ids, b_sims
