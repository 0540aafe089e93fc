"""Input validation shared by the public ops: one place, one message style
("<name> must be <expected>; got <received>")."""

from __future__ import annotations

import numpy as np
import torch

from ._backends import BACKENDS, load_cuda, load_core, load_triton, triton_interpreted


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


def resolve_backend(backend: str | None, device: torch.device, *, op: str,
                    greedy_only_triton: bool = False) -> str:
    """Pick the backend for tensors on ``device``: the forced one (checked), else the fastest
    available: cpu for CPU tensors, cuda then triton for CUDA tensors, reference otherwise."""
    if backend is None or backend == "":
        if device.type == "cpu":
            return "cpu" if load_core() is not None else "reference"
        if device.type == "cuda":
            if load_cuda() is not None:
                return "cuda"
            if load_triton() is not None and not greedy_only_triton:
                return "triton"
            return "reference"
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None; got {backend!r}")
    from ._backends import require_backend

    require_backend(backend)
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"{op}: backend 'cpu' needs CPU tensors; got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"{op}: backend 'cuda' needs CUDA tensors; got tensors on {device}")
    if backend == "triton" and device.type == "cpu" and not triton_interpreted():
        raise ValueError(f"{op}: backend 'triton' on CPU tensors needs TRITON_INTERPRET=1")
    return backend
