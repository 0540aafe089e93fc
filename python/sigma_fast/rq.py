"""Residual quantization ops: rq_encode, rq_decode, dedup_codes.

Public functions validate shapes, dtypes and devices (static facts, traceable by
torch.compile), then call the registered custom ops ``sigma_fast::rq_encode`` /
``sigma_fast::rq_decode``, whose implementations check values (finiteness, code ranges) and
dispatch to a backend.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import reference
from ._backends import (capturing, cuda_stream, eager, load_core, load_cuda, load_triton, run_op,
                        select)
from ._checks import (
    _host_array,
    as_tensor,
    check_alloc,
    check_dtype,
    check_finite,
    check_index_range,
    check_int,
    check_rank,
    check_same_device,
    to_output,
)

CODE_DTYPE = torch.int64  # dtype of the codes rq_encode returns
_FLT_MAX = float(np.finfo(np.float32).max)


def max_abs_value(dim: int, levels: int) -> float:
    """The largest magnitude ``rq_encode`` accepts in ``x`` and the codebooks (every backend):
    sqrt(FLT_MAX / D) / (L + 2). The kernels evaluate ||r||^2 - 2<r, c> + ||c||^2 in float32,
    where the residual r = x - (up to L codewords) has entries up to (L + 1)·M, so that sum is
    at most D·(L + 2)^2·M^2, which must not overflow float32 (an overflow turns every distance
    into +inf, and the code into 0)."""
    return math.sqrt(_FLT_MAX / dim) / (levels + 2)


def _check_magnitude(t: torch.Tensor, name: str, bound: float, why: str) -> None:
    """Every entry of t must be finite with |value| <= bound."""
    if t.numel() == 0:
        return
    a = _host_array(t)
    lo, hi = (float(a.min()), float(a.max())) if a is not None else \
        (float(t.min()), float(t.max()))
    if not (-bound <= lo and hi <= bound):  # NaN fails both
        check_finite(t, name)
        bad = (t.abs() > bound).nonzero()[0].tolist()
        raise ValueError(f"{name} must lie in [-{bound:.4g}, {bound:.4g}] ({why}); got "
                         f"{t[tuple(bad)].item():.6g} at index {bad}")


def effective_beam_width(beam_width: int, codebook_size: int, levels: int) -> int:
    """min(beam_width, K^L): a wider beam keeps every partial code at every level, so it
    returns exactly the codes of beam K^L."""
    widest = 1
    for _ in range(levels):
        if widest >= beam_width:
            break
        widest = min(beam_width, widest * codebook_size)
    return min(widest, beam_width)

# ------------------------------------------------------------------------------ backends
# Each takes validated tensors and returns tensors on the input's device.


def _encode_reference(x, codebooks, beam_width):
    levels, k, d = codebooks.shape
    _check_workspace(beam_width, levels, k, d, 1)
    codes, err = reference.rq_encode(
        x.detach().cpu().numpy(), codebooks.detach().cpu().numpy(), beam_width=beam_width
    )
    return torch.from_numpy(codes).to(x.device), torch.from_numpy(err).to(x.device)


def _encode_cpu(x, codebooks, beam_width):
    levels, k, d = codebooks.shape
    _check_workspace(beam_width, levels, k, d, load_core().get_num_threads())
    if x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous()
    codebooks = codebooks.contiguous()
    n, levels = x.shape[0], codebooks.shape[0]
    codes = torch.empty((n, levels), dtype=CODE_DTYPE)
    err = torch.empty((n,), dtype=torch.float32)
    load_core().rq_encode(x.detach().numpy(), codebooks.detach().numpy(), beam_width,
                          codes.numpy(), err.numpy())
    return codes, err


def _encode_cuda(x, codebooks, beam_width):
    mod = load_cuda()
    if x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous()
    codebooks = codebooks.contiguous()
    n, d = x.shape
    levels, k = codebooks.shape[:2]
    codes = torch.empty((n, levels), dtype=CODE_DTYPE, device=x.device)
    err = torch.empty((n,), dtype=torch.float32, device=x.device)
    ws = torch.empty(
        (mod.rq_encode_workspace_bytes(n, d, levels, k, beam_width),),
        dtype=torch.uint8, device=x.device,
    )
    with torch.cuda.device(x.device):
        mod.rq_encode(x.data_ptr(), n, d, x.stride(0) if n > 1 else d, codebooks.data_ptr(),
                      levels, k, beam_width, codes.data_ptr(), err.data_ptr(), ws.data_ptr(),
                      ws.numel(), cuda_stream(x.device))
    return codes, err


def _encode_triton(x, codebooks, beam_width):
    return load_triton().rq.rq_encode(x, codebooks)


_ENCODERS = {
    "reference": _encode_reference,
    "cpu": _encode_cpu,
    "cuda": _encode_cuda,
    "triton": _encode_triton,
}


# Decoders write into ``out`` [N, D] float32 (rows may be strided) and return the tensor that
# holds the result: ``out`` itself, or a tensor the caller copies into it (host copies).


def _decode_reference(codes, codebooks, levels, out):
    res = reference.rq_decode(codes.cpu().numpy(), codebooks.detach().cpu().numpy(),
                              levels=levels)
    out.copy_(torch.from_numpy(res))
    return out


def _decode_cpu(codes, codebooks, levels, out):
    if codes.shape[1] > 1 and codes.stride(1) != 1:
        codes = codes.contiguous()
    codebooks = codebooks.contiguous()
    load_core().rq_decode(codes.numpy(), codebooks.detach().numpy(), levels, out.numpy())
    return out


def _decode_cuda(codes, codebooks, levels, out):
    mod = load_cuda()
    if codes.shape[1] > 1 and codes.stride(1) != 1:
        codes = codes.contiguous()
    codebooks = codebooks.contiguous()
    n = codes.shape[0]
    k, d = codebooks.shape[1:]
    target = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype,
                                                         device=out.device)
    with torch.cuda.device(codebooks.device):
        mod.rq_decode(codes.data_ptr(), codes.dtype == torch.int64, n,
                      codes.stride(0) if n > 1 else codes.shape[1], levels,
                      codebooks.data_ptr(), k, d, target.data_ptr(),
                      cuda_stream(codebooks.device))
    if target is not out:
        out.copy_(target)
    return out


def _decode_triton(codes, codebooks, levels, out):
    return load_triton().rq.rq_decode(codes, codebooks, levels, out=out)


_DECODERS = {
    "reference": _decode_reference,
    "cpu": _decode_cpu,
    "cuda": _decode_cuda,
    "triton": _decode_triton,
}

# --------------------------------------------------------------------------- custom ops


# The implementations check values (a host sync on CUDA, skipped while a CUDA graph is being
# captured), then dispatch.


def _rq_encode_impl(x: torch.Tensor, codebooks: torch.Tensor, beam_width: int, backend: str):
    if not capturing(x.device):
        levels, _, d = codebooks.shape
        bound = max_abs_value(d, levels)
        why = (f"sqrt(FLT_MAX / D) / (L + 2) for D = {d}, L = {levels}: the float32 distances "
               f"of the kernels must not overflow")
        _check_magnitude(x, "x", bound, why)
        _check_magnitude(codebooks, "codebooks", bound, why)
    unsupported = {} if beam_width == 1 else {
        "triton": f"encodes greedily only (beam_width=1); got beam_width={beam_width}: use "
                  f"backend='cuda' or 'cpu'"}
    _, encode = select("rq_encode", _ENCODERS, backend, x.device, unsupported=unsupported)
    return encode(x, codebooks, beam_width)


def _decode_into(codes, codebooks, levels, backend, out):
    if not capturing(codebooks.device):
        check_finite(codebooks, "codebooks")
        check_index_range(codes[:, :levels], "codes", codebooks.shape[1])
    _, decode = select("rq_decode", _DECODERS, backend, codebooks.device)
    res = decode(codes, codebooks, levels, out)
    if res is not out:  # computed on host copies
        out.copy_(res)


def _rq_decode_impl(codes: torch.Tensor, codebooks: torch.Tensor, levels: int, backend: str):
    out = torch.empty((codes.shape[0], codebooks.shape[2]), dtype=torch.float32,
                      device=codebooks.device)
    _decode_into(codes, codebooks, levels, backend, out)
    return out


@torch.library.custom_op("sigma_fast::rq_encode", mutates_args=())
def _rq_encode_op(
    x: torch.Tensor, codebooks: torch.Tensor, beam_width: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rq_encode_impl(x, codebooks, beam_width, backend)


@_rq_encode_op.register_fake
def _(x, codebooks, beam_width, backend):
    return (
        x.new_empty((x.shape[0], codebooks.shape[0]), dtype=CODE_DTYPE),
        x.new_empty((x.shape[0],), dtype=torch.float32),
    )


@torch.library.custom_op("sigma_fast::rq_decode", mutates_args=())
def _rq_decode_op(
    codes: torch.Tensor, codebooks: torch.Tensor, levels: int, backend: str
) -> torch.Tensor:
    return _rq_decode_impl(codes, codebooks, levels, backend)


@_rq_decode_op.register_fake
def _(codes, codebooks, levels, backend):
    return codebooks.new_empty((codes.shape[0], codebooks.shape[2]))


@torch.library.custom_op("sigma_fast::rq_decode_out", mutates_args=("out",))
def _rq_decode_out_op(
    codes: torch.Tensor, codebooks: torch.Tensor, levels: int, backend: str, out: torch.Tensor
) -> None:
    _decode_into(codes, codebooks, levels, backend, out)


@_rq_decode_out_op.register_fake
def _(codes, codebooks, levels, backend, out):
    return None


# ------------------------------------------------------------------------------ public ops


def _check_codebooks(codebooks: torch.Tensor) -> None:
    check_dtype(codebooks, "codebooks", (torch.float32,))
    check_rank(codebooks, "codebooks", 3, "[L, K, D]")
    levels, k, d = codebooks.shape
    if levels < 1 or k < 1 or d < 1:
        raise ValueError(f"codebooks must have L >= 1, K >= 1, D >= 1; got shape {list(codebooks.shape)}")


def _check_beam_width(beam_width, levels: int, k: int) -> int:
    """The beam width to run: min(beam_width, K^L), which must keep B·K below 2^31."""
    asked = check_int(beam_width, "beam_width", 1)
    beam = effective_beam_width(asked, k, levels)
    if beam * k >= 2**31:
        raise ValueError(f"beam_width * K must be < 2^31 (candidates are numbered in 32 bits); "
                         f"got beam_width = {asked} (min(beam_width, K^L) = {beam}) with K = "
                         f"{k}")
    return beam


def _check_workspace(beam: int, levels: int, k: int, d: int, threads: int) -> None:
    """Per worker thread the C++ beam search holds residuals (twice), dot products and code
    prefixes (twice) of max(1, 192 // B) rows of B beams (csrc/rq_cpu.cpp)."""
    if beam == 1:
        return
    rows = max(1, 192 // beam)
    kpad = -(-k // 8) * 8
    per_thread = rows * beam * (4 * (2 * d + kpad + 2) + 16 * levels)
    check_alloc(threads * per_thread, f"beam_width={beam} (after clamping to K^L) with D = {d}, "
                f"K = {k}, L = {levels}: the beam search workspace of {threads} thread(s)")


def rq_encode(x, codebooks, *, beam_width: int = 1, return_error: bool = False,
              backend: str | None = None):
    """Residual-quantize the rows of ``x``.

    Args:
        x: float32 [N, D], torch tensor (CPU or CUDA) or NumPy array. Rows may be strided.
        codebooks: float32 [L, K, D] on the same device.
        beam_width: 1 for greedy encoding, B > 1 for beam search.
        return_error: also return each row's final squared reconstruction error.
        backend: force "reference", "cpu", "cuda" or "triton" (greedy only); default picks
            the fastest available for the input's device.

    Returns:
        codes int64 [N, L] (and err float32 [N] when ``return_error``), of the input's kind
        and device.

    Semantics (exactly those of ``sigma_fast.reference.rq_encode``)::

        r = x
        for l in range(L):
            k = argmin_k ||r - C[l, k]||^2          # ties: the smaller k
            codes[:, l] = k;  r = r - C[l, k]
        err = ||r||^2

    With beam_width = B: after each level keep the B partial codes with the smallest
    residual error (ties: lexicographically smaller code tuple), return the best final one.
    Backends compute distances as ||r||^2 - 2<r, c> + ||c||^2 in float32, so they can
    disagree with the reference only where two candidates are within float32 rounding.

    Limits (every backend, checked before any work): entries of ``x`` and ``codebooks`` must
    be finite with magnitude at most ``max_abs_value(D, L)`` = sqrt(FLT_MAX / D) / (L + 2)
    (about 1.9e17 for D = 256, L = 4), so the float32 distances cannot overflow. A beam wider
    than K^L gives the codes of beam K^L (it is clamped); the clamped B must keep B·K below
    2^31 (candidates are numbered in 32 bits) and its workspace within the machine's memory,
    or ValueError says how much it would need.
    """
    x_t, was_numpy = as_tensor(x, "x")
    cb_t, _ = as_tensor(codebooks, "codebooks")
    check_dtype(x_t, "x", (torch.float32,))
    check_rank(x_t, "x", 2, "[N, D]")
    _check_codebooks(cb_t)
    check_same_device(x_t, "x", cb_t, "codebooks")
    if cb_t.shape[2] != x_t.shape[1]:
        raise ValueError(
            f"codebooks must have D = {x_t.shape[1]} (x's last dimension); got shape {list(cb_t.shape)}"
        )
    beam_width = _check_beam_width(beam_width, cb_t.shape[0], cb_t.shape[1])
    codes, err = run_op(torch.ops.sigma_fast.rq_encode, _rq_encode_impl, x_t, cb_t, beam_width,
                        backend or "")
    if return_error:
        return to_output(codes, was_numpy), to_output(err, was_numpy)
    return to_output(codes, was_numpy)


def rq_decode(codes, codebooks, *, levels: int | None = None, out=None,
              backend: str | None = None):
    """Reconstruct vectors from codes: ``out = sum_{l < levels} codebooks[l, codes[:, l]]``,
    summed in level order in float32.

    Args:
        codes: int32 or int64 [N, L'] with L' <= L (extra levels of codebooks are unused).
        codebooks: float32 [L, K, D].
        levels: decode only the first ``levels`` levels (default: all of codes' columns).
        out: optional float32 [N, D] buffer to write into (a tensor on the codebooks' device,
            or a writable NumPy array for NumPy inputs); rows may be strided (each row
            contiguous); it must not share memory with codes or codebooks. Decoding into a
            buffer that is reused (already touched) avoids the page faults of a fresh output.

    Returns float32 [N, D] of the codes' kind and the codebooks' device (``out`` itself when
    given). Codes outside [0, K) raise IndexError naming the first one (``out`` is then
    unspecified).
    """
    codes_t, was_numpy = as_tensor(codes, "codes")
    cb_t, _ = as_tensor(codebooks, "codebooks")
    check_dtype(codes_t, "codes", (torch.int32, torch.int64))
    check_rank(codes_t, "codes", 2, "[N, L]")
    _check_codebooks(cb_t)
    check_same_device(cb_t, "codebooks", codes_t, "codes")
    if codes_t.shape[1] > cb_t.shape[0]:
        raise ValueError(
            f"codes must have at most L = {cb_t.shape[0]} columns (codebook levels); got shape "
            f"{list(codes_t.shape)}"
        )
    if levels is None:
        levels = codes_t.shape[1]
    levels = check_int(levels, "levels", 0)
    if levels > codes_t.shape[1]:
        raise ValueError(f"levels must be <= {codes_t.shape[1]} (codes' columns); got {levels}")
    if out is None:
        res = run_op(torch.ops.sigma_fast.rq_decode, _rq_decode_impl, codes_t, cb_t, levels,
                     backend or "")
        return to_output(res, was_numpy)
    out_t = _check_out(out, codes_t, cb_t)
    run_op(torch.ops.sigma_fast.rq_decode_out, _rq_decode_out_impl, codes_t, cb_t, levels,
           backend or "", out_t)
    return out


def _rq_decode_out_impl(codes, codebooks, levels, backend, out):
    _decode_into(codes, codebooks, levels, backend, out)


def _check_out(out, codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """``out`` as a tensor that decoding may write into, or an exception saying why not."""
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        raise ValueError("out must be writable; got a read-only NumPy array")
    out_t, _ = as_tensor(out, "out")
    check_dtype(out_t, "out", (torch.float32,))
    want = [codes.shape[0], codebooks.shape[2]]
    if list(out_t.shape) != want:
        raise ValueError(f"out must be [N, D] = {want} (codes' rows, codebooks' D); got shape "
                         f"{list(out_t.shape)}")
    check_same_device(codebooks, "codebooks", out_t, "out")
    if out_t.numel() and out_t.shape[1] > 1 and out_t.stride(1) != 1:
        raise ValueError(f"out rows must be contiguous (stride 1 along D); got strides "
                         f"{list(out_t.stride())}")
    if out_t.numel() and out_t.stride(0) < out_t.shape[1] and out_t.shape[0] > 1:
        raise ValueError(f"out rows must not overlap (row stride >= D = {out_t.shape[1]}); got "
                         f"strides {list(out_t.stride())}")
    for other, name in ((codes, "codes"), (codebooks, "codebooks")):
        if eager() and other.numel() and out_t.numel() and (  # storages: not traceable
                out_t.untyped_storage().data_ptr() == other.untyped_storage().data_ptr()):
            raise ValueError(f"out must not share memory with {name}")
    return out_t


def dedup_codes(codes, *, max_suffix: int | None = None):
    """Append one level that makes every full code unique.

    The j-th occurrence (in row order, counting from 0) of a code gets suffix j, so the
    result is deterministic and stable in item order. Returns ``(codes [N, L+1], max_used)``
    where ``max_used`` is the largest suffix assigned (-1 for N = 0). Raises ValueError if
    ``max_used`` would exceed ``max_suffix`` (e.g. the size of the extra level's vocabulary
    minus one).
    """
    codes_t, was_numpy = as_tensor(codes, "codes")
    check_dtype(codes_t, "codes", (torch.int32, torch.int64))
    check_rank(codes_t, "codes", 2, "[N, L]")
    if max_suffix is not None:
        max_suffix = check_int(max_suffix, "max_suffix", 0)
    arr = codes_t.detach().cpu().numpy()
    n = arr.shape[0]
    suffix = np.zeros((n,), dtype=arr.dtype)
    max_used = -1
    if n:
        _, inverse, counts = np.unique(arr, axis=0, return_inverse=True, return_counts=True)
        inverse = inverse.reshape(-1)
        order = np.argsort(inverse, kind="stable")  # rows grouped by code, in item order
        group_start = np.concatenate(([0], np.cumsum(counts)[:-1]))
        rank_in_group = np.arange(n) - group_start[inverse[order]]
        suffix[order] = rank_in_group
        max_used = int(counts.max()) - 1
        if max_suffix is not None and max_used > max_suffix:
            worst = arr[np.nonzero(inverse == int(np.argmax(counts)))[0][0]].tolist()
            raise ValueError(
                f"dedup_codes: code {worst} is shared by {max_used + 1} rows, which needs suffix "
                f"{max_used}; max_suffix is {max_suffix}"
            )
    out = np.concatenate([arr, suffix[:, None]], axis=1)
    out_t = torch.from_numpy(out).to(codes_t.device)
    return to_output(out_t, was_numpy), max_used
