"""Trie-constrained beam search step: constrained_beam_step.

The public function validates shapes, dtypes and devices (static facts, traceable by
torch.compile), then runs the custom op ``sigma_fast::constrained_beam_step`` (``run_op``: its
implementation directly in eager mode, the registered op when tracing), which dispatches to a
backend (each backend checks values: beam scores, states, NaN logits). The op takes the trie's
CSR arrays as tensors (custom ops cannot take Python objects).
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from . import reference
from ._backends import cuda_stream, eager, load_core, load_cuda, load_triton, run_op, select
from ._checks import (
    as_tensor,
    check_alloc,
    check_dtype,
    check_int,
    check_mask,
    check_rank,
    check_same_device,
    memory_bytes,
    to_output,
)
from .reference.beam_step import NORMALIZE, ON_EMPTY
from .trie import PrefixTrie

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class BeamStep(NamedTuple):
    """Output of ``constrained_beam_step``, each [B, W], best beam first."""

    scores: torch.Tensor  # float32; -inf for padding beams
    parent: torch.Tensor  # int64 index into the input beams; -1 for padding
    token: torch.Tensor  # int64 code chosen at this level; -1 for padding
    states: torch.Tensor  # int64 trie node reached; -1 for padding


# ------------------------------------------------------------------------------ backends
# Each takes validated tensors (allowed: None or [1 or B, num_nodes]) and returns four tensors
# on the input's device.


def _step_reference(logits, beam_scores, states, co, ct, cn, allowed, beam_width, normalize,
                    on_empty):
    def np_(t):
        return None if t is None else t.detach().cpu().numpy()

    trie = {"child_offsets": np_(co), "child_tokens": np_(ct), "child_nodes": np_(cn)}
    al = np_(allowed)
    if al is not None and al.shape[0] == 1:
        al = al[0]
    out = reference.constrained_beam_step(np_(logits), np_(beam_scores), np_(states), trie,
                                          beam_width=beam_width, allowed=al,
                                          normalize=normalize, on_empty=on_empty)
    return tuple(torch.from_numpy(o).to(logits.device) for o in out)


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _step_cpu(logits, beam_scores, states, co, ct, cn, allowed, beam_width, normalize, on_empty):
    logits = _rows_contiguous(logits)  # a strided view of a wider vocabulary is used in place
    if allowed is not None:
        allowed = _rows_contiguous(allowed)
    # resolve_neg: a lazily negated view (torch._neg_view) has no NumPy form of its values.
    out = load_core().constrained_beam_step(
        logits.detach().resolve_neg().numpy(), beam_scores.resolve_neg().contiguous().numpy(),
        states.resolve_neg().contiguous().numpy(),
        co.numpy(), ct.numpy(), cn.numpy(), None if allowed is None else allowed.numpy(),
        beam_width, NORMALIZE.index(normalize), on_empty == "pad")
    return tuple(torch.from_numpy(o) for o in out)


# Per-request status codes of the device kernels (BeamStepStatus in csrc/beam_step.h;
# triton/beam_step.py mirrors them).
_OK, _EMPTY, _BAD_SCORE, _BAD_STATE, _BAD_LOGIT, _BAD_TRIE = range(6)


def _raise_for_status(status, logits, beam_scores, states, num_nodes, on_empty):
    """Raise the error of the first failing request, if any, from the kernels' status [B, 2]
    (code, beam). Costs one device-to-host copy (a sync): called only for on_empty="error".
    Messages match the cpu backend's."""
    codes = status.cpu()
    failing = (codes[:, 0] != _OK).nonzero()
    if not failing.numel():
        return
    b = int(failing[0, 0])
    code, w = int(codes[b, 0]), int(codes[b, 1])
    where = f"request {b}, beam {w}"
    if code == _EMPTY:
        if on_empty == "error":
            raise ValueError(
                f"request {b} has no valid continuation: no live beam has a child in the trie "
                f"that is allowed and has a finite score (pass on_empty='pad' to get padding "
                f"beams instead)")
        return
    if code == _BAD_SCORE:
        raise ValueError(f"beam_scores must be finite or -inf (padding); got "
                         f"{beam_scores[b, w].item()} at {where}")
    if code == _BAD_STATE:
        raise IndexError(f"states must lie in [0, {num_nodes}) for non-padding beams; got "
                         f"{states[b, w].item()} at {where}")
    if code == _BAD_LOGIT:
        row = logits[b, w].cpu()
        i = int((~(row < float("inf"))).nonzero()[0, 0])
        raise ValueError(f"logits must not be NaN or +inf; got {row[i].item()} at {where}, "
                         f"index {i}")
    raise IndexError(f"corrupt trie: a child offset, token or node of the state at {where} is "
                     f"out of range")


def _check_trie_device(logits, co):
    if co.device != logits.device:
        raise ValueError(f"the trie's arrays must be on the same device as logits "
                         f"({logits.device}); got {co.device} (use trie.to(device))")


def _step_cuda(logits, beam_scores, states, co, ct, cn, allowed, beam_width, normalize,
               on_empty):
    mod = load_cuda()
    _check_trie_device(logits, co)
    logits = _rows_contiguous(logits)
    beam_scores, states = beam_scores.contiguous(), states.contiguous()
    b, w_in, k = logits.shape
    dev = logits.device
    scores = torch.empty((b, beam_width), dtype=torch.float32, device=dev)
    parent, token, nxt = (torch.empty((b, beam_width), dtype=torch.int64, device=dev)
                          for _ in range(3))
    status = torch.empty((b, 2), dtype=torch.int32, device=dev)
    if b == 0:
        return scores, parent, token, nxt
    ld_allowed = 0
    if allowed is not None:
        allowed = _rows_contiguous(allowed)
        ld_allowed = allowed.stride(0) if allowed.shape[0] > 1 else 0
    ws = torch.empty((mod.constrained_beam_step_workspace_bytes(b, w_in, k, beam_width),),
                     dtype=torch.uint8, device=dev)
    with torch.cuda.device(dev):
        mod.constrained_beam_step(
            logits.data_ptr(), b, w_in, k, logits.stride(0), logits.stride(1),
            beam_scores.data_ptr(), states.data_ptr(), co.data_ptr(), ct.data_ptr(),
            cn.data_ptr(), co.shape[0] - 1, ct.shape[0],
            0 if allowed is None else allowed.data_ptr(), ld_allowed, beam_width,
            NORMALIZE.index(normalize), scores.data_ptr(), parent.data_ptr(), token.data_ptr(),
            nxt.data_ptr(), status.data_ptr(), ws.data_ptr(), ws.numel(), cuda_stream(dev))
    if on_empty == "error":
        _raise_for_status(status, logits, beam_scores, states, co.shape[0] - 1, on_empty)
    return scores, parent, token, nxt


def _step_triton(logits, beam_scores, states, co, ct, cn, allowed, beam_width, normalize,
                 on_empty):
    _check_trie_device(logits, co)
    out, status = load_triton().beam_step.constrained_beam_step(
        logits, beam_scores, states, co, ct, cn, allowed, beam_width,
        NORMALIZE.index(normalize))
    if on_empty == "error":
        _raise_for_status(status, logits, beam_scores, states, co.shape[0] - 1, on_empty)
    return out


_STEPPERS = {
    "reference": _step_reference,
    "cpu": _step_cpu,
    "cuda": _step_cuda,
    "triton": _step_triton,
}

# Every backend checks beam scores, states and NaN logits itself: the C++ in its loop, the
# device kernels through their status array (a check here would cost a sync per step).


# --------------------------------------------------------------------------- custom op


def _beam_step_impl(logits, beam_scores, states, child_offsets, child_tokens, child_nodes,
                    allowed, beam_width, normalize, on_empty, backend):
    if allowed is not None and allowed.dim() == 1:
        allowed = allowed.unsqueeze(0)
    _, step = select("constrained_beam_step", _STEPPERS, backend, logits.device)
    return step(logits, beam_scores, states, child_offsets, child_tokens, child_nodes, allowed,
                beam_width, normalize, on_empty)


@torch.library.custom_op("sigma_fast::constrained_beam_step", mutates_args=())
def _beam_step_op(
    logits: torch.Tensor, beam_scores: torch.Tensor, states: torch.Tensor,
    child_offsets: torch.Tensor, child_tokens: torch.Tensor, child_nodes: torch.Tensor,
    allowed: torch.Tensor | None, beam_width: int, normalize: str, on_empty: str, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _beam_step_impl(logits, beam_scores, states, child_offsets, child_tokens, child_nodes,
                           allowed, beam_width, normalize, on_empty, backend)


@_beam_step_op.register_fake
def _(logits, beam_scores, states, child_offsets, child_tokens, child_nodes, allowed,
      beam_width, normalize, on_empty, backend):
    b = logits.shape[0]
    return (
        logits.new_empty((b, beam_width), dtype=torch.float32),
        logits.new_empty((b, beam_width), dtype=torch.int64),
        logits.new_empty((b, beam_width), dtype=torch.int64),
        logits.new_empty((b, beam_width), dtype=torch.int64),
    )


# ------------------------------------------------------------------------------ public op


def constrained_beam_step(logits, beam_scores, states, trie: PrefixTrie, *, beam_width: int,
                          allowed=None, normalize: str = "full", on_empty: str = "error",
                          backend: str | None = None) -> BeamStep:
    """One step of beam search constrained to the prefixes of ``trie`` (DESIGN.md section 3).

    Args:
        logits: [B, W_in, K] next-token logits of each input beam over the K = trie.codebook_size
            codes of this level; float32 (bf16 / fp16 are upcast). May be a strided view such as
            ``lm_logits[:, :, off:off + K]`` of a wider vocabulary (rows need stride 1 in the
            last dimension only; the cpu backend reads the view in place).
        beam_scores: float32 [B, W_in], cumulative log-probabilities; -inf marks a padding beam
            (a search starts with one real beam per request and W_in - 1 padding beams).
        states: int64 [B, W_in], the trie node of each beam (root = 0; ignored for padding).
        trie: the PrefixTrie, on the same device as the other tensors (``trie.to(device)``).
        beam_width: W >= 1, the number of output beams per request.
        allowed: None, bool [num_nodes] shared by every request, or bool [B, num_nodes] per
            request (from ``trie.allowed_nodes(item_mask)``): restricts candidates to nodes
            with at least one allowed item below them.
        normalize: how a token's log-probability is obtained from its logit: "full"
            (log-softmax over all K codes, default), "valid" (log-softmax over the beam's valid
            children only) or "none" (logits already are log-probabilities).
        on_empty: a request with no candidate at all raises ValueError naming it ("error",
            default) or gets W padding beams ("pad").
        backend: "reference", "cpu", "cuda" or "triton"; default picks the fastest for the
            device (cpu for CPU tensors; cuda, else triton, else reference for CUDA tensors).

    Returns ``BeamStep(scores float32, parent int64, token int64, states int64)``, each [B, W],
    of the input's kind and device, sorted best first::

        for each request b:
            candidates = [(beam_scores[b, w] + logprob(b, w, token), w, token, child)
                          for each live beam w (beam_scores[b, w] > -inf)
                          for each (token, child) under states[b, w]
                          if allowed is None or allowed[b][child]]   # -inf scores dropped
            keep the W best: score descending, then parent w ascending, then token ascending
            pad the rest with (-inf, -1, -1, -1)

    A beam whose node has no valid child contributes nothing; a request with no candidate at
    all is an error unless ``on_empty="pad"``. NaN or +inf logits in a live beam's row, NaN or
    +inf beam scores, and states outside [0, num_nodes) for live beams raise. The result does
    not depend on the backend's thread count. Scores are float32 sums; with normalize="full" or
    "valid" backends may differ from the reference by a few ulp of the log-sum-exp (see
    ``sigma_fast.testing.assert_beam_step_close``).

    On the cuda and triton backends the step is one launch with no host synchronisation
    (capturable in a CUDA graph with ``on_empty="pad"``): the kernel writes a per-request
    status, and with ``on_empty="error"`` the status is copied to the host after the launch
    (one sync) to raise the errors above. With ``on_empty="pad"`` nothing is read back, so bad
    values cannot raise there: such a request gets W beams with score NaN and parent / token /
    state -1 (a NaN beam score is itself a bad value at the next step), and the other requests
    are unaffected.
    """
    if (type(logits) is torch.Tensor and type(beam_scores) is torch.Tensor  # noqa: E721
            and type(states) is torch.Tensor and (backend is None or backend == "cpu")  # noqa: E721
            and eager()):
        out = _step_cpu_fast(logits, beam_scores, states, trie, beam_width, allowed, normalize,
                             on_empty)
        if out is not None:
            return out
    return _constrained_beam_step(logits, beam_scores, states, trie, beam_width, allowed,
                                  normalize, on_empty, backend)


def _constrained_beam_step(logits, beam_scores, states, trie, beam_width, allowed, normalize,
                           on_empty, backend):
    """The general path: every input kind, device and backend, with the full checks."""
    if not isinstance(trie, PrefixTrie):
        raise TypeError(f"trie must be a sigma_fast.PrefixTrie; got {type(trie).__name__}")
    lg, was_numpy = as_tensor(logits, "logits")
    bs, _ = as_tensor(beam_scores, "beam_scores")
    st, _ = as_tensor(states, "states")
    check_dtype(lg, "logits", _LOGIT_DTYPES)
    check_rank(lg, "logits", 3, "[B, W_in, K]")
    check_dtype(bs, "beam_scores", (torch.float32,))
    check_rank(bs, "beam_scores", 2, "[B, W_in]")
    check_dtype(st, "states", (torch.int64,))
    check_rank(st, "states", 2, "[B, W_in]")
    b, w_in, k = lg.shape
    if list(bs.shape) != [b, w_in] or list(st.shape) != [b, w_in]:
        raise ValueError(f"beam_scores and states must be [B, W_in] = [{b}, {w_in}] (logits' "
                         f"first dimensions); got {list(bs.shape)} and {list(st.shape)}")
    if k != trie.codebook_size:
        raise ValueError(f"logits must have K = {trie.codebook_size} (trie.codebook_size) in "
                         f"the last dimension; got shape {list(lg.shape)}")
    check_same_device(lg, "logits", bs, "beam_scores")
    check_same_device(lg, "logits", st, "states")
    if trie.device != lg.device:
        raise ValueError(f"trie must be on the same device as logits ({lg.device}); got "
                         f"{trie.device} (use trie.to(device))")
    al = None
    if allowed is not None:
        al, _ = check_mask(allowed, "allowed", trie.num_nodes, "trie.num_nodes", batch=b)
        check_same_device(lg, "logits", al, "allowed")
    beam_width = check_int(beam_width, "beam_width", 1)
    _check_output_size(b, beam_width)
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}; got {normalize!r}")
    if on_empty not in ON_EMPTY:
        raise ValueError(f"on_empty must be one of {ON_EMPTY}; got {on_empty!r}")
    if lg.dtype != torch.float32:
        lg = lg.float()
    args = (lg, bs, st, trie.child_offsets, trie.child_tokens, trie.child_nodes, al, beam_width,
            normalize, on_empty, backend or "")
    out = run_op(torch.ops.sigma_fast.constrained_beam_step, _beam_step_impl, *args)
    return BeamStep(*(to_output(o, was_numpy) for o in out))


def _check_output_size(batch: int, beam_width: int) -> None:
    """The outputs are four [B, W] arrays (float32 + 3 x int64): W must fit in memory."""
    check_alloc(28 * batch * beam_width, f"beam_width={beam_width} for B={batch} requests: the "
                f"four [B, beam_width] outputs (scores, parent, token, states)")


# ------------------------------------------------------------------------ cpu fast path
# A step at small sizes is tens of microseconds of C++, so the Python around it counts: the
# common case (CPU float32 / int64 torch tensors, eager mode, cpu backend) is recognised with a
# few cheap tests and goes straight to the C++ step, which checks shapes, strides and values
# itself; anything else (or anything wrong) takes the general path and its messages.

_NORMALIZE_CODE = {name: i for i, name in enumerate(NORMALIZE)}
_MEMORY = memory_bytes()
_TRIE_NUMPY: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _trie_numpy(trie: PrefixTrie):
    """NumPy views of the trie's CSR arrays, cached per trie while its tensors stay the same
    objects; (None, None, None) for a trie off the CPU."""
    co, ct, cn = trie.child_offsets, trie.child_tokens, trie.child_nodes
    hit = _TRIE_NUMPY.get(trie)
    if hit is not None and hit[0] is co and hit[1] is ct and hit[2] is cn:
        return hit[3]
    if not (co.is_cpu and ct.is_cpu and cn.is_cpu):
        return None, None, None
    arrays = (co.numpy(), ct.numpy(), cn.numpy())
    _TRIE_NUMPY[trie] = (co, ct, cn, arrays)
    return arrays


def _step_cpu_fast(logits, beam_scores, states, trie, beam_width, allowed, normalize, on_empty):
    """The step for the common CPU case, or None when the general path must take the call.

    The tensors reach C++ as addresses with their sizes and strides (NumPy views of them would
    cost more than a small step), so every property the C++ side relies on is tested here:
    dtypes, CPU, shapes, contiguity, no lazily negated views (the general path explains
    whatever fails)."""
    if not (type(trie) is PrefixTrie and logits.dtype is torch.float32  # noqa: E721
            and beam_scores.dtype is torch.float32 and states.dtype is torch.int64
            and logits.is_cpu and beam_scores.is_cpu and states.is_cpu
            and type(beam_width) is int and beam_width >= 1  # noqa: E721
            and on_empty in ON_EMPTY
            and not (logits.is_neg() or beam_scores.is_neg() or states.is_neg())):
        return None
    code = _NORMALIZE_CODE.get(normalize)
    shape = logits.shape
    if (code is None or len(shape) != 3 or shape[2] != trie.codebook_size
            or beam_scores.shape != shape[:2] or states.shape != shape[:2]
            or not (beam_scores.is_contiguous() and states.is_contiguous())):
        return None
    co, ct, cn = _trie_numpy(trie)  # None unless the trie is on the CPU
    if co is None or 28 * shape[0] * beam_width > _MEMORY:
        return None  # the general path explains
    al, ld_al = 0, 0
    if allowed is not None:
        if not (type(allowed) is torch.Tensor and allowed.dtype is torch.bool  # noqa: E721
                and allowed.is_cpu and allowed.dim() in (1, 2)
                and allowed.shape[-1] == trie.num_nodes):
            return None
        if allowed.dim() == 2 and allowed.shape[0] == shape[0]:
            if allowed.stride(1) != 1 and allowed.shape[1] > 1:
                allowed = allowed.contiguous()
            ld_al = allowed.stride(0) if shape[0] > 1 else 0
        elif allowed.dim() != 1:
            return None
        elif allowed.stride(0) != 1 and allowed.shape[0] > 1:
            allowed = allowed.contiguous()
        al = allowed.data_ptr()
    core = load_core()
    if core is None:
        return None
    ld_b, ld_w, ld_k = logits.stride()
    if ld_k != 1 and shape[2] > 1:
        logits = logits.contiguous()
        ld_b, ld_w, ld_k = logits.stride()
    out = core.constrained_beam_step_ptr(
        logits.data_ptr(), shape[0], shape[1], shape[2], ld_b, ld_w, beam_scores.data_ptr(),
        states.data_ptr(), co, ct, cn, al, ld_al, beam_width, code, on_empty == "pad")
    return BeamStep(torch.from_numpy(out[0]), torch.from_numpy(out[1]),
                    torch.from_numpy(out[2]), torch.from_numpy(out[3]))


__all__ = ["BeamStep", "constrained_beam_step"]
