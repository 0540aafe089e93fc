"""Adaptive probabilistic fusion: apf_fuse (steps 2 and 3 of SIGMA's three-step generation).

The public function validates shapes, dtypes and devices (static facts, traceable by
torch.compile), then runs the custom op ``sigma_fast::apf_fuse`` on the index's tensors
(``run_op``: its implementation directly in eager mode, the registered op when tracing); the
implementation checks values (finite scores, bucket ids in range, non-zero queries; skipped while
a CUDA graph is being captured, since the check synchronises) and dispatches to a backend.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch

from . import reference
from ._backends import (capturing, cuda_stream, eager, load_core, load_cuda, load_triton,
                        run_op, select)
from ._checks import (
    as_tensor,
    check_alloc,
    check_dtype,
    check_int,
    check_mask,
    check_rank,
    check_same_device,
    dtype_name,
    to_output,
)
from .item_index import ItemIndex

NORMALIZE_MODES = ("top_m", "bucket")

# The valid range of a request's inverse temperature t_b (see apf_fuse): every backend
# evaluates log P = (φ + t·s) - logsumexp(t·s) in float64 from float32 similarities s in
# [-1, 1] and stores it in float32. Above 2^28 the cancellation error of that sum, up to
# t·2^-52, exceeds the float32 spacing 2^-24 of a log-probability near 1 (at τ = 1e-30 it is
# ~1e14 and every bucket's best item gets log P = 0 whatever its φ); below 2^-28 t times the
# float32 resolution 2^-24 of a similarity falls under the float64 spacing 2^-52 of an O(1)
# score, so the similarities stop mattering (t = 0: a bucket's items tie and rank by id).
T_MIN, T_MAX = 2.0 ** -28, 2.0 ** 28
_T_RANGE = "[2^-28, 2^28] ~ [3.7e-09, 2.7e+08]"

# ------------------------------------------------------------------------------ backends
# Each takes validated tensors (allowed: None or bool [1 or B, id_bound]) and returns
# (ids, log_probs, sources, bucket_ids, bucket_sims) on the input's device; the bucket outputs
# have M = 0 columns unless return_buckets.


def _apf_reference(phi, pids, q, emb, offsets, item_ids, allowed, top_m, top_n, tau, adaptive,
                   sigma_min, normalize, dedup, return_buckets):
    index = SimpleNamespace(embeddings=emb.detach().cpu().numpy(),
                            offsets=offsets.cpu().numpy(), item_ids=item_ids.cpu().numpy())
    mask = None
    if allowed is not None:
        mask = allowed.cpu().numpy()
        mask = np.broadcast_to(mask, (phi.shape[0], mask.shape[1]))
    out = reference.apf_fuse(phi.detach().cpu().numpy(), pids.cpu().numpy(),
                             q.detach().cpu().numpy(), index, top_m=top_m, top_n=top_n, tau=tau,
                             adaptive=adaptive, sigma_min=sigma_min, allowed=mask,
                             normalize=normalize, dedup=dedup, return_buckets=True)
    out = [torch.from_numpy(np.ascontiguousarray(a)).to(phi.device) for a in out]
    if not return_buckets:
        out[3], out[4] = out[3][:, :, :0], out[4][:, :, :0]
    return tuple(out)


def _apf_cpu(phi, pids, q, emb, offsets, item_ids, allowed, top_m, top_n, tau, adaptive,
             sigma_min, normalize, dedup, return_buckets):
    b, k = phi.shape
    m = top_m if return_buckets else 0
    ids = torch.empty((b, top_n), dtype=torch.int64)
    logp = torch.empty((b, top_n), dtype=torch.float32)
    src = torch.empty((b, top_n), dtype=torch.int64)
    b_ids = torch.empty((b, k, m), dtype=torch.int64)
    b_sims = torch.empty((b, k, m), dtype=torch.float32)
    arr = lambda t: t.detach().contiguous().numpy()  # noqa: E731
    load_core().apf_fuse(
        arr(phi), arr(pids), arr(q), arr(emb), arr(offsets), arr(item_ids),
        None if allowed is None else arr(allowed), top_m, top_n, tau, adaptive, sigma_min,
        normalize == "bucket", dedup, ids.numpy(), logp.numpy(), src.numpy(),
        b_ids.numpy() if return_buckets else None, b_sims.numpy() if return_buckets else None)
    return ids, logp, src, b_ids, b_sims


_EMB_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # ApfEmbType, csrc/apf.h


def _apf_cuda(phi, pids, q, emb, offsets, item_ids, allowed, top_m, top_n, tau, adaptive,
              sigma_min, normalize, dedup, return_buckets):
    mod = load_cuda()
    if emb.dtype not in _EMB_TYPES:
        raise TypeError(f"apf_fuse (cuda): index embeddings must be float32, float16 or bfloat16; "
                        f"got {dtype_name(emb.dtype)}")
    device = phi.device
    b, k = phi.shape
    n_items, d = emb.shape
    m = top_m if return_buckets else 0
    phi, q, emb, offsets, item_ids = (t.detach().contiguous() for t in (phi, q, emb, offsets,
                                                                       item_ids))
    pids = pids.to(torch.int64).contiguous()
    ids = torch.empty((b, top_n), dtype=torch.int64, device=device)
    logp = torch.empty((b, top_n), dtype=torch.float32, device=device)
    src = torch.empty((b, top_n), dtype=torch.int64, device=device)
    b_ids = torch.empty((b, k, m), dtype=torch.int64, device=device)
    b_sims = torch.empty((b, k, m), dtype=torch.float32, device=device)
    mask_ptr, mask_ld, mask_len = 0, 0, 0
    if allowed is not None:
        allowed = allowed.contiguous().view(torch.uint8)
        mask_ptr, mask_len = allowed.data_ptr(), allowed.shape[1]
        mask_ld = 0 if allowed.shape[0] == 1 else mask_len
    ws = torch.empty((mod.apf_workspace_bytes(b, k, d, top_m),), dtype=torch.uint8, device=device)
    with torch.cuda.device(device):
        mod.apf_fuse(
            phi.data_ptr(), pids.data_ptr(), q.data_ptr(), b, k, emb.data_ptr(),
            _EMB_TYPES[emb.dtype], n_items, d, offsets.data_ptr(), offsets.shape[0] - 1,
            item_ids.data_ptr(), mask_ptr, mask_ld, mask_len, top_m, top_n, tau, adaptive,
            sigma_min, normalize == "bucket", dedup, ids.data_ptr(), logp.data_ptr(),
            src.data_ptr(), b_ids.data_ptr() if m else 0, b_sims.data_ptr() if m else 0,
            ws.data_ptr(), ws.numel(), cuda_stream(device))
    return ids, logp, src, b_ids, b_sims


def _apf_triton(*args):
    return load_triton().apf.apf_fuse(*args)


_APF = {
    "reference": _apf_reference,
    "cpu": _apf_cpu,
    "cuda": _apf_cuda,
    "triton": _apf_triton,
}

# --------------------------------------------------------------------------- custom ops


def _first(mask: torch.Tensor) -> list:
    return mask.nonzero()[0].tolist()


def _check_temperatures(phi, tau, adaptive, sigma_min):
    """Every request's t_b must lie in [T_MIN, T_MAX] (see apf_fuse)."""
    if not adaptive:
        return  # t = 1 / tau, checked by apf_fuse
    live = torch.isfinite(phi)
    count = live.sum(dim=1)
    rows = count > 0
    if not bool(rows.any()):
        return
    p64 = torch.where(live, phi.double(), 0.0)
    mean = p64.sum(dim=1) / count.clamp(min=1)
    var = torch.where(live, (p64 - mean[:, None]) ** 2, 0.0).sum(dim=1) / count.clamp(min=1)
    t = torch.clamp(var.sqrt(), min=sigma_min) / tau
    bad = rows & ((t < T_MIN) | (t > T_MAX))
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        sigma = float(var[b].sqrt())
        raise ValueError(
            f"apf_fuse: request {b} has temperature t_b = max(std(prefix_scores[{b}]) = "
            f"{sigma:.6g}, sigma_min = {sigma_min:g}) / tau = {float(t[b]):.6g}, outside "
            f"{_T_RANGE}, the range where every fused log-probability keeps float32 "
            f"precision (see the apf_fuse docstring)"
            + ("; its beams all have the same score: give sigma_min > 0" if sigma == 0 else ""))


def _check_values(phi, pids, q, num_buckets):
    bad = torch.isnan(phi) | (phi == math.inf)
    if bool(bad.any()):
        where = _first(bad)
        raise ValueError(f"prefix_scores must be finite or -inf (missing beam); got "
                         f"{phi[tuple(where)].item()} at index {where}")
    active = torch.isfinite(phi)
    bad = active & ((pids < 0) | (pids >= num_buckets))
    if bool(bad.any()):
        where = _first(bad)
        raise IndexError(f"prefix_ids must lie in [0, {num_buckets}) where prefix_scores is "
                         f"finite; got {pids[tuple(where)].item()} at index {where}")
    bad = active & ~torch.isfinite(q).all(dim=-1)
    if bool(bad.any()):
        raise ValueError(f"queries must be finite where prefix_scores is finite; got a "
                         f"non-finite value in queries{_first(bad)}")
    bad = active & (q == 0).all(dim=-1)
    if bool(bad.any()):
        raise ValueError(f"queries must be non-zero where prefix_scores is finite (they are "
                         f"L2-normalised); got an all-zero query at index {_first(bad)}")


def _triton_top_m_limit() -> float:
    tri = load_triton()
    return tri.apf.MAX_TOP_M if tri is not None else math.inf


def _apf_fuse_impl(prefix_scores, prefix_ids, queries, embeddings, offsets, item_ids, allowed,
                   top_m, top_n, tau, adaptive, sigma_min, normalize, dedup, return_buckets,
                   backend):
    if not capturing(queries.device):
        _check_values(prefix_scores, prefix_ids, queries, offsets.shape[0] - 1)
        _check_temperatures(prefix_scores, tau, adaptive, sigma_min)
    unsupported = {}
    if top_m > _triton_top_m_limit():
        unsupported["triton"] = (f"supports top_m <= {_triton_top_m_limit()}; got top_m={top_m}: "
                                 f"use backend='cuda' or 'cpu'")
    name, fuse = select("apf_fuse", _APF, backend, queries.device, unsupported=unsupported)
    if name != "cuda" and embeddings.dtype != torch.float32:
        raise TypeError(f"apf_fuse ({name}): index embeddings must be float32 (float16/bfloat16 "
                        f"indexes run on the cuda backend); got {dtype_name(embeddings.dtype)}")
    ids, logp, src, b_ids, b_sims = fuse(prefix_scores, prefix_ids, queries, embeddings, offsets,
                                         item_ids, allowed, top_m, top_n, tau, adaptive,
                                         sigma_min, normalize, dedup, return_buckets)
    # A -inf log-probability is padding on every backend: never a real id beside it.
    pad = torch.isneginf(logp)
    return (ids.masked_fill(pad, -1), logp, src.masked_fill(pad, -1), b_ids, b_sims)


@torch.library.custom_op("sigma_fast::apf_fuse", mutates_args=())
def _apf_fuse_op(
    prefix_scores: torch.Tensor, prefix_ids: torch.Tensor, queries: torch.Tensor,
    embeddings: torch.Tensor, offsets: torch.Tensor, item_ids: torch.Tensor,
    allowed: torch.Tensor | None, top_m: int, top_n: int, tau: float, adaptive: bool,
    sigma_min: float, normalize: str, dedup: bool, return_buckets: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _apf_fuse_impl(prefix_scores, prefix_ids, queries, embeddings, offsets, item_ids,
                          allowed, top_m, top_n, tau, adaptive, sigma_min, normalize, dedup,
                          return_buckets, backend)


@_apf_fuse_op.register_fake
def _(prefix_scores, prefix_ids, queries, embeddings, offsets, item_ids, allowed, top_m, top_n,
      tau, adaptive, sigma_min, normalize, dedup, return_buckets, backend):
    b, k = prefix_scores.shape
    m = top_m if return_buckets else 0
    return (
        prefix_scores.new_empty((b, top_n), dtype=torch.int64),
        prefix_scores.new_empty((b, top_n), dtype=torch.float32),
        prefix_scores.new_empty((b, top_n), dtype=torch.int64),
        prefix_scores.new_empty((b, k, m), dtype=torch.int64),
        prefix_scores.new_empty((b, k, m), dtype=torch.float32),
    )


# ------------------------------------------------------------------------------ public op


def _check_real(value, name: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a float; got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}; got {value}")
    return value


def _check_static_temperature(tau: float, adaptive: bool, sigma_min: float) -> None:
    """What tau and sigma_min alone decide of t_b's range (see apf_fuse)."""
    if not adaptive:
        if not T_MIN <= 1.0 / tau <= T_MAX:
            raise ValueError(f"tau must give t = 1 / tau in {_T_RANGE} (tau in [2^-28, 2^28]), "
                             f"the range where every fused log-probability keeps float32 "
                             f"precision (see the apf_fuse docstring); got tau = {tau:g}, "
                             f"t = {1.0 / tau:.6g}")
    elif sigma_min / tau > T_MAX:
        raise ValueError(f"sigma_min / tau must be <= 2^28 ~ 2.7e+08 (t_b = max(std(phi_b), "
                         f"sigma_min) / tau must lie in {_T_RANGE}, the range where every "
                         f"fused log-probability keeps float32 precision; see the apf_fuse "
                         f"docstring); got sigma_min = {sigma_min:g}, tau = {tau:g}, "
                         f"sigma_min / tau = {sigma_min / tau:.6g}")


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return bool(value)


def apf_fuse(prefix_scores, prefix_ids, queries, index: ItemIndex, *, top_m: int, top_n: int,
             tau: float, adaptive: bool = True, sigma_min: float = 1e-3, allowed=None,
             normalize: str = "top_m", dedup: bool = True, return_buckets: bool = False,
             backend: str | None = None):
    """Adaptive probabilistic fusion: in-bucket retrieval for each beam, a softmax per bucket
    scaled by the request's beam-score spread, and the global top N.

    Args:
        prefix_scores: φ, float32 [B, K]: the K beam log-probabilities of each request; -inf
            marks a missing (padding) beam. NaN and +inf are errors.
        prefix_ids: int32/int64 [B, K]: each beam's bucket id in ``index`` (see
            ``ItemIndex.bucket_of``); ignored where φ is -inf.
        queries: h, float32 [B, K, D]: each beam's ``<q>`` embedding; normalised by the op
            (must be finite and non-zero where φ is finite). Rows may be strided.
        index: the ``ItemIndex`` to search, on the inputs' device.
        top_m: M >= 1, candidates kept per beam. top_n: N >= 1, results per request.
        tau: τ > 0, the temperature.
        adaptive: t_b = max(σ_b, sigma_min) / τ, with σ_b the population standard deviation of
            request b's finite φ; otherwise t_b = 1 / τ. Every request's t_b must lie in
            [2^-28, 2^28] (≈ [3.7e-9, 2.7e8]); anything else raises ValueError. Why: log P =
            (φ + t·s) - logsumexp(t·s) is evaluated in float64 from float32 similarities s in
            [-1, 1] and stored in float32. Its cancellation error, up to t·2^-52, must stay
            under the float32 spacing 2^-24 of a log-probability near 1, so t <= 2^28 (beyond,
            the best item of every bucket tends to log P = 0 whatever its φ: at τ = 1e-30 the
            error is ~1e14); and t times the float32 resolution 2^-24 of a similarity must stay
            above the float64 spacing 2^-52 of an O(1) score, so t >= 2^-28 (below, the
            similarities stop counting; t = 0, e.g. equal beam scores with sigma_min = 0, ties
            every item of a bucket). The τ and sigma_min values alone are checked on every
            call; the σ_b-dependent bound too, except while a CUDA graph is being captured.
        sigma_min: floor of σ_b (>= 0). The default 1e-3 matters when σ_b = 0 (K = 1, or all
            beams equally likely): t_b then is 1e-3 / τ (0.02 at τ = 0.05), so the fused score
            is essentially φ - log M and items rank by beam first, then by similarity.
        allowed: None, bool [id_bound] shared by every request, or bool [B, id_bound] per
            request, indexed by caller item id (``index.id_bound`` = max item id + 1). An item
            outside the mask is never retrieved nor counted in a softmax.
        normalize: "top_m" (the paper's: softmax over the M kept candidates) or "bucket" (over
            every allowed item of the bucket: exact, slower).
        dedup: an item reachable from two beams (two beams on the same bucket) is returned
            once, with its best log P; with False it may appear once per beam.
        return_buckets: also return every beam's top-M list.
        backend: force "reference", "cpu", "cuda" or "triton" (top_m <= 256); default picks
            the fastest available: cpu for CPU inputs; for CUDA inputs cuda, else triton, else
            the cpu kernel on host copies.

    Returns:
        ``(item_ids int64 [B, N], log_probs float32 [B, N], source_ranks int64 [B, N])``,
        padded with -1 / -inf / -1 when a request has fewer than N candidates; source_ranks is
        the beam k each item came from. A log-probability of -inf always comes with id -1
        and source -1 (padding), on every backend. With ``return_buckets`` also
        ``(bucket_item_ids int64 [B, K, M], bucket_sims float32 [B, K, M])``, best first,
        padded with -1 / -inf (skipped beams are all padding). NumPy in, NumPy out.

    Semantics (exactly those of ``sigma_fast.reference.apf_fuse``)::

        for b in range(B):
            beams = [k for k in range(K) if φ[b, k] > -inf]     # none: all padding
            t = max(std(φ[b, beams]), sigma_min) / τ if adaptive else 1 / τ
            cands = []
            for k in beams:
                items = allowed items of bucket prefix_ids[b, k]     # none: skip the beam
                s_i = <h[b, k] / |h[b, k]|, v_i>                    # v_i: normalised row
                kept = top M of items by s_i (ties: smaller item id)
                lse = logsumexp(t * s_j for j in kept)               # "bucket": j in items
                cands += [(φ[b, k] + t * s_i - lse, i, k) for i in kept]
            sort cands by log P descending, then item id, then k
            if dedup: keep the first occurrence of each item
            the first N are the outputs

    The cpu, cuda and triton backends compute s_i in float32 (the reference in float64 from
    the same float32 vectors; never TF32) and the rest in float64, so they differ from the
    reference only in near-ties and in float32 rounding of log P
    (``sigma_fast.testing.assert_apf_close`` states the tolerance).
    """
    if not isinstance(index, ItemIndex):
        raise TypeError(f"index must be a sigma_fast.ItemIndex; got {type(index).__name__}")
    phi, was_numpy = as_tensor(prefix_scores, "prefix_scores")
    if phi.device != index.device:
        raise ValueError(f"the index must be on the inputs' device: prefix_scores are on "
                         f"{phi.device}, the index on {index.device} (use "
                         f"index.to('{phi.device}'))")
    pids, _ = as_tensor(prefix_ids, "prefix_ids")
    q, _ = as_tensor(queries, "queries")
    check_dtype(phi, "prefix_scores", (torch.float32,))
    check_rank(phi, "prefix_scores", 2, "[B, K]")
    check_dtype(pids, "prefix_ids", (torch.int32, torch.int64))
    check_dtype(q, "queries", (torch.float32,))
    b, k = phi.shape
    if list(pids.shape) != [b, k]:
        raise ValueError(f"prefix_ids must be [B, K] = {[b, k]} (prefix_scores' shape); got "
                         f"shape {list(pids.shape)}")
    if list(q.shape) != [b, k, index.dim]:
        raise ValueError(f"queries must be [B, K, D] = {[b, k, index.dim]} (prefix_scores' "
                         f"shape and the index's dim); got shape {list(q.shape)}")
    check_same_device(index.embeddings, "the index", phi, "prefix_scores")
    check_same_device(index.embeddings, "the index", pids, "prefix_ids")
    check_same_device(index.embeddings, "the index", q, "queries")
    if allowed is not None:
        mask, _ = check_mask(allowed, "allowed", index.id_bound, "index.id_bound", batch=b)
        check_same_device(index.embeddings, "the index", mask, "allowed")
        allowed = mask if mask.dim() == 2 else mask.unsqueeze(0)
    top_m = check_int(top_m, "top_m", 1)
    top_n = check_int(top_n, "top_n", 1)
    check_alloc(b * top_n * 20, f"top_n={top_n} for B={b} requests: the outputs (int64, "
                f"float32, int64 [B, top_n])")
    tau = _check_real(tau, "tau", positive=True)
    sigma_min = _check_real(sigma_min, "sigma_min", positive=False)
    adaptive = _check_bool(adaptive, "adaptive")
    return_buckets = _check_bool(return_buckets, "return_buckets")
    if return_buckets:
        check_alloc(b * k * top_m * 12, f"top_m={top_m} with return_buckets for B={b} "
                    f"requests of K={k} beams: the int64 and float32 [B, K, top_m] outputs")
    _check_static_temperature(tau, adaptive, sigma_min)
    dedup = _check_bool(dedup, "dedup")
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}; got {normalize!r}")
    if pids.dtype != torch.int64:
        pids = pids.to(torch.int64)
    if eager() and not capturing(phi.device):
        index._revalidate_if_edited()
    out = run_op(torch.ops.sigma_fast.apf_fuse, _apf_fuse_impl, phi, pids, q, index.embeddings,
                 index.offsets, index.item_ids, allowed, top_m, top_n, tau, adaptive, sigma_min,
                 normalize, dedup, return_buckets, backend or "")
    out = tuple(to_output(t, was_numpy) for t in out)
    return out if return_buckets else out[:3]
