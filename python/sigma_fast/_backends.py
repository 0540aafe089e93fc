"""Which backends this installation can run, and why not where it cannot."""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

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
