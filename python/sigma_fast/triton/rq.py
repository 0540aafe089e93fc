"""Residual quantization in Triton: greedy ``rq_encode`` and ``rq_decode``.

Semantics are those of ``sigma_fast.reference.rq`` (greedy only)::

    r = x
    for l in range(L):
        k = argmin_k ||C[l, k]||^2 - 2 <r, C[l, k]>     # fp32; ties: the smaller k
        codes[:, l] = k;  r = r - C[l, k]                # fp32
    err = ||r||^2

Encode runs one program per block of BLOCK_N rows. For each level it walks the codebook in
tiles of BLOCK_K codewords, scores a tile with one ``tl.dot`` (IEEE fp32, never TF32: codes
must match the reference away from near-ties; see USE_TL_DOT for the interpreter), and keeps
a running (min score, argmin) per row; tiles are visited in increasing k and only a strictly
smaller score replaces the running minimum, so ties go to the smaller k. The chosen codewords
are then gathered and subtracted. When D fits one block (D <= _MAX_RESIDENT_D) the residual
block stays in registers across levels; otherwise it lives in a per-call fp32 workspace that
the owning program walks in BLOCK_D chunks (no other program touches those rows).

Inputs are validated by ``sigma_fast.rq``; these functions assume float32 tensors on one
device (CUDA, or CPU under ``TRITON_INTERPRET=1``) and codes already in [0, K).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


# Largest (power-of-two padded) D whose residual block is kept in registers.
_MAX_RESIDENT_D = 64
# Chunk width for the workspace path (D > _MAX_RESIDENT_D).
_CHUNK_D = 32
# Score tiles with tl.dot (True) or a broadcast multiply + row sum (False). None = tl.dot on a
# GPU, the row sum under the interpreter: there tl.dot is np.matmul, whose BLAS rounds
# identical columns differently depending on their position in the tile, so duplicate
# codewords would break the smaller-k tie rule. The GPU's IEEE fp32 dot evaluates every
# output element in the same order, so identical codewords score identically. Set True to
# exercise the tl.dot path under the interpreter.
USE_TL_DOT: bool | None = None


@triton.jit
def _tile_dots(r, c, acc, USE_DOT: tl.constexpr):
    """acc + r @ c^T in fp32: r [BLOCK_N, BLOCK_D], c [BLOCK_K, BLOCK_D]."""
    if USE_DOT:
        return tl.dot(r, tl.trans(c), acc, input_precision="ieee")
    else:
        return acc + tl.sum(r[:, None, :] * c[None, :, :], axis=2)


@triton.jit
def _argmin_update(best_s, best_i, dots, cnorm_ptr, k0, K, offs_k):
    """Fold one code tile into the running per-row (min score, argmin)."""
    ks = k0 + offs_k
    k_mask = ks < K
    cn = tl.load(cnorm_ptr + ks, mask=k_mask, other=0.0)
    score = cn[None, :] - 2.0 * dots
    score = tl.where(k_mask[None, :], score, float("inf"))
    tile_s = tl.min(score, axis=1)
    tile_i = tl.argmin(score, axis=1, tie_break_left=True) + k0
    # Strict '<': an equal score from a later tile (larger k) never wins.
    better = tile_s < best_s
    best_s = tl.where(better, tile_s, best_s)
    best_i = tl.where(better, tile_i, best_i)
    return best_s, best_i


@triton.jit
def _rq_encode_resident_kernel(
    x_ptr, stride_xn, stride_xd,
    cb_ptr, cnorm_ptr,
    codes_ptr, err_ptr,
    N, D, L, K,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = rows < N
    d_mask = offs_d < D
    nd_mask = n_mask[:, None] & d_mask[None, :]

    # Padded rows/columns are zero and stay zero: padded columns of every codeword load as 0.
    r = tl.load(x_ptr + rows[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                mask=nd_mask, other=0.0)

    cb_level = cb_ptr  # advanced by one level (K * D) per iteration, in 64-bit pointer math
    cn_level = cnorm_ptr
    for level in range(L):
        best_s = tl.full((BLOCK_N,), float("inf"), tl.float32)
        best_i = tl.zeros((BLOCK_N,), tl.int32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            c = tl.load(cb_level + ks[:, None].to(tl.int64) * D + offs_d[None, :],
                        mask=(ks < K)[:, None] & d_mask[None, :], other=0.0)
            dots = _tile_dots(r, c, tl.zeros((BLOCK_N, BLOCK_K), tl.float32), USE_DOT)
            best_s, best_i = _argmin_update(best_s, best_i, dots, cn_level,
                                            k0, K, offs_k)
        tl.store(codes_ptr + rows * L + level, best_i.to(tl.int64), mask=n_mask)
        chosen = tl.load(cb_level + best_i[:, None].to(tl.int64) * D + offs_d[None, :],
                         mask=nd_mask, other=0.0)
        r = r - chosen
        cb_level += K * D
        cn_level += K

    tl.store(err_ptr + rows, tl.sum(r * r, axis=1), mask=n_mask)


@triton.jit
def _rq_encode_chunked_kernel(
    ws_ptr,  # [N, D] contiguous fp32, holds x on entry and the residual after each level
    cb_ptr, cnorm_ptr,
    codes_ptr, err_ptr,
    N, D, L, K,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = rows < N
    ws_rows = ws_ptr + rows[:, None] * D

    cb_level = cb_ptr  # advanced by one level (K * D) per iteration, in 64-bit pointer math
    cn_level = cnorm_ptr
    for level in range(L):
        best_s = tl.full((BLOCK_N,), float("inf"), tl.float32)
        best_i = tl.zeros((BLOCK_N,), tl.int32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < K
            dots = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + offs_d
                d_mask = cols < D
                r = tl.load(ws_rows + cols[None, :],
                            mask=n_mask[:, None] & d_mask[None, :], other=0.0)
                c = tl.load(cb_level + ks[:, None].to(tl.int64) * D + cols[None, :],
                            mask=k_mask[:, None] & d_mask[None, :], other=0.0)
                dots = _tile_dots(r, c, dots, USE_DOT)
            best_s, best_i = _argmin_update(best_s, best_i, dots, cn_level,
                                            k0, K, offs_k)
        tl.store(codes_ptr + rows * L + level, best_i.to(tl.int64), mask=n_mask)
        # The residual is rewritten in place and reread by other threads of this program:
        # barriers order those global-memory accesses within the block.
        tl.debug_barrier()
        chosen_rows = cb_level + best_i[:, None].to(tl.int64) * D
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + offs_d
            m = n_mask[:, None] & (cols < D)[None, :]
            r = tl.load(ws_rows + cols[None, :], mask=m, other=0.0)
            chosen = tl.load(chosen_rows + cols[None, :], mask=m, other=0.0)
            tl.store(ws_rows + cols[None, :], r - chosen, mask=m)
        tl.debug_barrier()
        cb_level += K * D
        cn_level += K

    err = tl.zeros((BLOCK_N,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        r = tl.load(ws_rows + cols[None, :], mask=n_mask[:, None] & (cols < D)[None, :],
                    other=0.0)
        err += tl.sum(r * r, axis=1)
    tl.store(err_ptr + rows, err, mask=n_mask)


@triton.jit
def _rq_decode_kernel(
    codes_ptr, stride_cn, stride_cl,
    cb_ptr, out_ptr, stride_on,
    N, D, K, LEVELS,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_mask = rows < N
    m = n_mask[:, None] & (cols < D)[None, :]
    # Start from 0 and add levels in order, in fp32, exactly as the reference does.
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    code_ptrs = codes_ptr + rows * stride_cn
    cb_level = cb_ptr
    for level in range(LEVELS):
        code = tl.load(code_ptrs, mask=n_mask, other=0).to(tl.int64)
        acc += tl.load(cb_level + code[:, None] * D + cols[None, :], mask=m, other=0.0)
        code_ptrs += stride_cl
        cb_level += K * D
    tl.store(out_ptr + rows[:, None] * stride_on + cols[None, :], acc, mask=m)


def _device_guard(t: torch.Tensor):
    # Launch on the tensors' device (Triton uses the current device and its current stream).
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _encode_config(d: int) -> dict:
    """Block sizes by D. tl.dot needs every dimension >= 16, so small shapes are padded and
    masked. An IEEE fp32 tl.dot is lowered to FMAs with each thread's rows and columns of both
    operands held in registers for the whole reduction, so its register use grows with the
    reduction width: these tiles compile without spills for sm_80/sm_90 (ptxas -v), and wider
    D is walked in _CHUNK_D-column chunks through the workspace instead."""
    block_d = max(16, triton.next_power_of_2(d))
    if block_d <= 16:
        return dict(resident=True, BLOCK_N=64, BLOCK_K=64, BLOCK_D=block_d, num_warps=8)
    if block_d <= _MAX_RESIDENT_D:
        return dict(resident=True, BLOCK_N=64, BLOCK_K=32, BLOCK_D=block_d, num_warps=8)
    return dict(resident=False, BLOCK_N=64, BLOCK_K=64, BLOCK_D=_CHUNK_D, num_warps=8)


def rq_encode(x: torch.Tensor, codebooks: torch.Tensor):
    """Greedy residual quantization of ``x`` [N, D] (float32, rows may be strided) with
    ``codebooks`` [L, K, D] (float32, same device).

    Returns ``(codes, err)``: codes int64 [N, L], err float32 [N] = ||final residual||^2.
    """
    n, d = x.shape
    levels, k = codebooks.shape[:2]
    codes = torch.empty((n, levels), dtype=torch.int64, device=x.device)
    err = torch.empty((n,), dtype=torch.float32, device=x.device)
    if n == 0:
        return codes, err
    codebooks = codebooks.contiguous()
    cfg = _encode_config(d)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    meta = dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"],
                num_warps=cfg["num_warps"],
                USE_DOT=x.is_cuda if USE_TL_DOT is None else bool(USE_TL_DOT))
    with _device_guard(x):
        cnorm = (codebooks * codebooks).sum(dim=2)  # [L, K] fp32
        if cfg["resident"]:
            _rq_encode_resident_kernel[grid](
                x, x.stride(0), x.stride(1), codebooks, cnorm, codes, err,
                n, d, levels, k, **meta,
            )
        else:
            ws = torch.empty((n, d), dtype=torch.float32, device=x.device)
            ws.copy_(x)
            _rq_encode_chunked_kernel[grid](
                ws, codebooks, cnorm, codes, err, n, d, levels, k, **meta,
            )
    return codes, err


def rq_decode(codes: torch.Tensor, codebooks: torch.Tensor, levels: int,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[n] = sum_{l < levels} codebooks[l, codes[n, l]]`` summed in level order in fp32.

    codes int32 or int64 [N, L'] (strided allowed), values in [0, K); writes float32 [N, D]
    into ``out`` (rows may be strided, each row contiguous) or a new tensor, and returns it.
    """
    n = codes.shape[0]
    k, d = codebooks.shape[1:]
    if out is None:
        out = torch.empty((n, d), dtype=torch.float32, device=codebooks.device)
    if n == 0:
        return out
    codebooks = codebooks.contiguous()
    # Memory-bound gather: at most 16 elements per thread keeps registers low (<= 90 on sm_90).
    block_d = min(triton.next_power_of_2(d), 128)
    block_n = 128 if block_d <= 16 else 16
    grid = (triton.cdiv(n, block_n), triton.cdiv(d, block_d))
    with _device_guard(codebooks):
        _rq_decode_kernel[grid](
            codes, codes.stride(0), codes.stride(1), codebooks, out,
            out.stride(0) if n > 1 else d, n, d, k, levels,
            BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
        )
    return out
