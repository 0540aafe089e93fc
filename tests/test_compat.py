"""Dependency floors: an unsupported torch or transformers fails with the version it needs, and
the floors checked at run time are the ones the package metadata declares."""

import importlib
import importlib.metadata
import re

import pytest
import torch

import sigma_fast
from sigma_fast import _compat


@pytest.mark.parametrize("version, expected", [
    ("2.5.0", (2, 5, 0)), ("2.13.0+cpu", (2, 13, 0)), ("2.6.0a0+git1a2b3c", (2, 6, 0)),
    ("2.7.0.dev20250101", (2, 7, 0)), ("5.0", (5, 0)), ("v4.57.1", (4, 57, 1)),
])
def test_version_tuple(version, expected):
    assert _compat.version_tuple(version) == expected


def test_version_tuple_rejects_garbage():
    with pytest.raises(ValueError, match="not a version number"):
        _compat.version_tuple("unknown")


@pytest.mark.parametrize("found", ["2.3.1", "2.4.1+cpu", "1.13.0"])
def test_old_torch_is_named(found):
    with pytest.raises(ImportError) as info:
        _compat.check_torch(found)
    assert str(info.value) == (f"sigma_fast needs torch >= 2.5 (torch.library.custom_op with "
                               f"string annotations); found {found}")


@pytest.mark.parametrize("found", ["2.5.0", "2.5.0a0+gitabc", "2.13.0+cpu", "3.0.0"])
def test_supported_torch_passes(found):
    _compat.check_torch(found)


def test_import_checks_torch(monkeypatch):
    """``import sigma_fast`` itself refuses an old torch (re-running the package's __init__
    with torch reporting 2.4.1)."""
    monkeypatch.setattr(torch, "__version__", "2.4.1")
    with pytest.raises(ImportError, match=r"needs torch >= 2\.5 .*; found 2\.4\.1"):
        importlib.reload(sigma_fast)


@pytest.mark.parametrize("found", ["5.1.0", "5.0.0", "4.57.1"])
def test_old_transformers_is_named(found):
    with pytest.raises(ImportError) as info:
        _compat.check_transformers(found)
    assert str(info.value) == (f"sigma_fast needs transformers >= 5.2 (masking_utils."
                               f"create_bidirectional_mask(inputs_embeds=...)); found {found}")


@pytest.mark.parametrize("found", ["5.2.0", "5.25.0", "6.0.0.dev0"])
def test_supported_transformers_passes(found):
    _compat.check_transformers(found)


def _fake_installed(monkeypatch, versions):
    real = importlib.metadata.version

    def version(name):
        if name in versions:
            if versions[name] is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return versions[name]
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)


def test_transformers_checked_where_first_used(monkeypatch):
    """``sigma_fast._hf`` (the transformers shims every model-driving module imports) checks the
    installed transformers when it is imported, without importing transformers."""
    import sigma_fast._hf as hf

    _fake_installed(monkeypatch, {"transformers": "5.1.0"})
    with pytest.raises(ImportError, match=r"needs transformers >= 5\.2 .*; found 5\.1\.0"):
        importlib.reload(hf)


def test_missing_transformers_is_not_an_import_error(monkeypatch):
    import sigma_fast._hf as hf

    _fake_installed(monkeypatch, {"transformers": None})
    importlib.reload(hf)
    _fake_installed(monkeypatch, {"transformers": "5.2.0"})
    importlib.reload(hf)


def _declared_floors():
    """{(distribution, extra or None): minimum} from the installed package metadata."""
    try:
        requires = importlib.metadata.requires("sigma_fast") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("sigma_fast is not installed (no package metadata to compare with)")
    floors = {}
    for req in requires:
        m = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)(?:\s*;\s*extra\s*==\s*\"(\w+)\")?", req)
        if m:
            floors[(m.group(1).lower(), m.group(3))] = _compat.version_tuple(m.group(2))
    return floors


def test_metadata_declares_the_checked_floors():
    floors = _declared_floors()
    assert floors[("torch", None)] == _compat.TORCH_MIN
    for extra in ("model", "test"):
        assert floors[("transformers", extra)] == _compat.TRANSFORMERS_MIN


def test_one_version():
    """``sigma_fast.__version__`` (from _version.py) is the version the package was built with."""
    try:
        installed = importlib.metadata.version("sigma_fast")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("sigma_fast is not installed (no package metadata to compare with)")
    assert sigma_fast.__version__ == installed
