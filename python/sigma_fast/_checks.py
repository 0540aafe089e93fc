"""Input validation shared by the public ops: one place, one message style
("<name> must be <expected>; got <received>")."""

from __future__ import annotations

import os

import numpy as np
import torch


def as_tensor(a, name: str) -> tuple[torch.Tensor, bool]:
    """Return ``(tensor, was_numpy)``; NumPy arrays are wrapped without a copy when possible."""
    if isinstance(a, torch.Tensor):
        return a, False
    if isinstance(a, np.ndarray):
        if not a.flags.writeable:
            a = a.copy()  # torch.from_numpy cannot share read-only memory
        try:
            return torch.from_numpy(a), True
        except TypeError as exc:
            raise TypeError(f"{name} must be a numeric NumPy array; got dtype {a.dtype}") from exc
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray; got {type(a).__name__}")


def as_id_tensor(ids, name: str) -> torch.Tensor:
    """A tensor of item ids from a tensor, an array or a list / tuple of ints."""
    if isinstance(ids, (list, tuple)):
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise TypeError(f"{name} must be a 1-d sequence of ints; got {ids!r:.80}")
        ids = arr.astype(np.int64)
    return as_tensor(ids, name)[0]


def to_output(t: torch.Tensor, was_numpy: bool):
    return t.numpy() if was_numpy else t


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_dtype(t: torch.Tensor, name: str, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        want = " or ".join(dtype_name(d) for d in allowed)
        raise TypeError(f"{name} must be {want}; got {dtype_name(t.dtype)}")


def check_rank(t: torch.Tensor, name: str, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{name} must be {rank}-d {layout}; got shape {list(t.shape)}")


def check_same_device(ref: torch.Tensor, ref_name: str, t: torch.Tensor, name: str) -> None:
    if t.device != ref.device:
        raise ValueError(
            f"{name} must be on the same device as {ref_name} ({ref.device}); got {t.device}"
        )


def check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return int(value)


def check_mask(mask, name: str, width: int, width_name: str, *, batch: int | None = None):
    """A bool mask over ``width`` entries (items or trie nodes), ``[width]`` shared by every
    request or ``[batch, width]`` one row per request (any number of rows when ``batch`` is
    None). Returns ``(tensor, was_numpy)``; the one place that states what a mask must be."""
    m, was_numpy = as_tensor(mask, name)
    check_dtype(m, name, (torch.bool,))
    rows = "B" if batch is None else f"B = {batch}"
    if not (m.dim() == 1 and m.shape[0] == width) and not (
            m.dim() == 2 and m.shape[1] == width and (batch is None or m.shape[0] == batch)):
        raise ValueError(f"{name} must be a mask [{width_name} = {width}] shared by every "
                         f"request or [{rows}, {width_name} = {width}] per request; got shape "
                         f"{list(m.shape)}")
    return m, was_numpy


# Value checks of CPU tensors run in NumPy: torch's CPU reductions wake its OpenMP pool, whose
# spinning threads would then compete with the C++ kernels' threads for the cores.


def _host_array(t: torch.Tensor):
    return t.detach().numpy() if t.device.type == "cpu" and t.dtype != torch.bfloat16 else None


def check_finite(t: torch.Tensor, name: str) -> None:
    if t.numel() == 0:
        return
    a = _host_array(t)
    ok = bool(np.isfinite(a).all()) if a is not None else bool(torch.isfinite(t).all())
    if not ok:
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise ValueError(f"{name} must be finite; got {t[tuple(bad)].item()} at index {bad}")


def check_index_range(t: torch.Tensor, name: str, upper: int) -> None:
    """Every entry of integer tensor t must lie in [0, upper)."""
    if t.numel() == 0:
        return
    a = _host_array(t)
    lo, hi = (int(a.min()), int(a.max())) if a is not None else (int(t.min()), int(t.max()))
    if lo < 0 or hi >= upper:
        bad_value = lo if lo < 0 else hi
        where = (t == bad_value).nonzero()[0].tolist()
        raise IndexError(f"{name} must lie in [0, {upper}); got {bad_value} at index {where}")


# ------------------------------------------------------------------------- allocation sizes
# Sizes and counts that decide how much memory an op allocates (a beam width, a codebook size,
# the length of an output) are checked against the machine's memory before any allocation, so
# an absurd value raises a ValueError stating the bound instead of failing deep inside C++ (or
# being killed by the system).


def _physical_memory() -> int:
    env = os.environ.get("SIGMA_FAST_MAX_ALLOC_BYTES")
    if env:
        return int(env)
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - no sysconf
        return 1 << 40


# Read once at import: the checks also run while torch.compile traces the ops.
_MEMORY_BYTES = _physical_memory()


def memory_bytes() -> int:
    """The machine's physical memory in bytes (the bound of :func:`check_alloc`);
    ``SIGMA_FAST_MAX_ALLOC_BYTES`` (read at import) overrides it."""
    return _MEMORY_BYTES


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


def check_alloc(nbytes: int, what: str) -> None:
    """Raise ValueError when ``nbytes`` (what ``what`` would allocate) exceeds the machine's
    memory; the message names the sizes through ``what`` and states the bound."""
    limit = _MEMORY_BYTES
    if nbytes > limit:
        raise ValueError(f"{what} would need {gib(nbytes)}, more than this machine's "
                         f"{gib(limit)} of memory")
