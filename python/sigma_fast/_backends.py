"""Which backends this installation can run (and why not where it cannot), and the one dispatch
rule every op follows.

Dispatch (``select``): a forced ``backend`` is checked and used; otherwise CPU tensors run on
``cpu`` (the C++ core), CUDA tensors on ``cuda``, else ``triton``, else the C++ core on host
copies, else the NumPy ``reference``. Each op registers its implementations in a dict
``{backend: fn}``; ``run_op`` calls a registered custom op directly in plain eager mode and
through ``torch.ops`` under torch.compile, export or a dispatch mode.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

BACKENDS = ("reference", "cpu", "cuda", "triton")


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is unavailable, or what it runs on

    def __bool__(self) -> bool:  # so `if backends()["cuda"]:` reads naturally
        return self.available


def _import_error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@lru_cache(maxsize=None)
def load_core():
    """The C++ extension, or None when it failed to import."""
    try:
        return importlib.import_module("sigma_fast._core")
    except Exception as exc:  # noqa: BLE001 - any import failure disables the backend
        _errors["cpu"] = _import_error_text(exc)
        return None


@lru_cache(maxsize=None)
def load_cuda():
    """The CUDA extension with a usable device, or None (the reason goes to backends())."""
    info = build_info()
    if info.get("cuda") not in ("ON", "TRUE", "1", "YES"):
        _errors["cuda"] = f"the CUDA extension was not built ({info.get('cuda_reason', 'unknown')})"
        return None
    try:
        mod = importlib.import_module("sigma_fast._cuda")
    except Exception as exc:  # noqa: BLE001
        _errors["cuda"] = "the CUDA extension failed to import: " + _import_error_text(exc)
        return None
    try:
        import torch

        if not torch.cuda.is_available():
            _errors["cuda"] = "torch sees no CUDA device"
            return None
    except Exception as exc:  # noqa: BLE001
        _errors["cuda"] = _import_error_text(exc)
        return None
    return mod


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@lru_cache(maxsize=None)
def load_triton():
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        _errors["triton"] = "triton is not importable: " + _import_error_text(exc)
        return None
    import torch

    if not torch.cuda.is_available() and not triton_interpreted():
        _errors["triton"] = (
            "no CUDA device; set TRITON_INTERPRET=1 before importing triton to run the "
            "Triton kernels on the CPU interpreter"
        )
        return None
    return importlib.import_module("sigma_fast.triton")


_errors: dict[str, str] = {}


@lru_cache(maxsize=None)
def build_info() -> dict:
    """What the compiled part of this installation was built with."""
    path = Path(__file__).with_name("_build_info.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"cuda": "OFF", "cuda_reason": "no build information (package not built?)"}


def backends() -> dict[str, BackendStatus]:
    """Report every backend: ``{name: BackendStatus(name, available, reason)}``.

    ``reference`` (NumPy) is always available; ``cpu`` needs the C++ extension; ``cuda`` needs
    the CUDA extension and a CUDA device; ``triton`` needs triton and either a CUDA device or
    ``TRITON_INTERPRET=1`` (CPU interpreter, for testing).
    """
    out = {"reference": BackendStatus("reference", True, "NumPy, always available")}
    core = load_core()
    out["cpu"] = (
        BackendStatus("cpu", True, f"C++ core, {core.dot_kernel_name()} kernels, "
                      f"{core.get_num_threads()} threads")
        if core is not None
        else BackendStatus("cpu", False, "the C++ extension failed to import: "
                           + _errors.get("cpu", "unknown"))
    )
    cuda = load_cuda()
    out["cuda"] = (
        BackendStatus("cuda", True, "CUDA extension")
        if cuda is not None
        else BackendStatus("cuda", False, _errors.get("cuda", "unknown"))
    )
    tri = load_triton()
    out["triton"] = (
        BackendStatus("triton", True, "CPU interpreter" if triton_interpreted() else "CUDA")
        if tri is not None
        else BackendStatus("triton", False, _errors.get("triton", "unknown"))
    )
    return out


_LOADERS = {"cpu": load_core, "cuda": load_cuda, "triton": load_triton}


def require_backend(name: str):
    """Return the loaded module of an available backend (None for ``reference``), or raise
    naming why it is unavailable."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
    if name == "reference":
        return None
    module = _LOADERS[name]()
    if module is None:
        raise RuntimeError(f"backend {name!r} is not available: {backends()[name].reason}")
    return module


# ------------------------------------------------------------------------------- dispatch
def select(op: str, impls: dict[str, Callable], backend: str | None, device, *,
           unsupported: dict[str, str] | None = None) -> tuple[str, Callable]:
    """``(backend name, implementation)`` of ``op`` for tensors on ``device`` (see the module
    docstring; the C++ core on host copies of CUDA tensors is named "cpu").

    ``unsupported`` maps backends that cannot run this particular call to the reason (e.g. the
    Triton RQ encoder is greedy only): forcing one raises NotImplementedError with the reason;
    the default choice skips it.
    """
    unsupported = unsupported or {}
    if backend:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None; got {backend!r}")
        require_backend(backend)
        if backend in ("cpu", "cuda") and device.type != backend:
            raise ValueError(f"{op}: backend {backend!r} needs {backend.upper()} tensors; got "
                             f"tensors on {device}")
        if backend == "triton" and device.type == "cpu" and not triton_interpreted():
            raise ValueError(f"{op}: backend 'triton' on CPU tensors needs TRITON_INTERPRET=1")
        if backend in unsupported:
            raise NotImplementedError(f"{op}: the {backend} backend {unsupported[backend]}")
        return backend, impls[backend]
    if device.type == "cpu":
        name = "cpu" if load_core() is not None else "reference"
        return name, impls[name]
    if device.type == "cuda":
        if load_cuda() is not None and "cuda" not in unsupported:
            return "cuda", impls["cuda"]
        if load_triton() is not None and "triton" not in unsupported:
            return "triton", impls["triton"]
        if load_core() is not None:
            return "cpu", on_host(impls["cpu"], device)
    return "reference", impls["reference"]


def on_host(fn: Callable, device) -> Callable:
    """``fn`` run on CPU copies of its tensor arguments, its tensor results moved to ``device``."""
    import torch

    def host(*args):
        out = fn(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
        if isinstance(out, torch.Tensor):
            return out.to(device)
        return tuple(o.to(device) if isinstance(o, torch.Tensor) else o for o in out)

    return host


try:
    from torch.utils._python_dispatch import _get_current_dispatch_mode
except ImportError:  # pragma: no cover - other torch versions: always go through the dispatcher
    _get_current_dispatch_mode = None


def eager() -> bool:
    """True outside torch.compile / export tracing and outside any TorchDispatchMode (fake
    tensors, ...): then an op's implementation can run directly."""
    import torch

    if _get_current_dispatch_mode is None or torch.compiler.is_compiling():
        return False
    return _get_current_dispatch_mode() is None


def run_op(op, impl: Callable, *args):
    """Call a registered custom op ``op`` (``torch.ops.sigma_fast.<name>``) whose Python body is
    ``impl``: directly in plain eager mode (a Python custom op's dispatch costs tens of
    microseconds, more than a small op), through the dispatcher when tracing or under a
    dispatch mode, so torch.compile and export see the op and its fake kernel."""
    return impl(*args) if eager() else op(*args)


def cuda_stream(device) -> int:
    """The raw handle of the caller's current CUDA stream on ``device`` (kernels never launch on
    stream 0 unless the caller is on it)."""
    import torch

    return torch.cuda.current_stream(device).cuda_stream


def capturing(device) -> bool:
    """True while the current CUDA stream of ``device`` is being captured into a CUDA graph:
    host-side value checks (which synchronise) must be skipped then."""
    if getattr(device, "type", None) != "cuda":
        return False
    import torch

    return torch.cuda.is_current_stream_capturing()
