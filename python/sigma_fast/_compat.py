"""The oldest dependency versions sigma_fast runs with, checked where each is first needed, so
that an old install fails with the version it needs rather than an error deep inside an API.

- torch, when ``sigma_fast`` is imported: every op is a ``torch.library.custom_op`` whose
  schema torch infers from the op's annotations, which are strings in our modules
  (``from __future__ import annotations``); torch 2.4 rejects those, 2.5 evaluates them.
- transformers, when ``sigma_fast._hf`` is imported (every module that drives a transformers
  model goes through it): ``masking_utils.create_bidirectional_mask`` first shipped in 5.0, and
  takes the embeddings as ``inputs_embeds`` (the keyword the grounding tower passes) from 5.2.
  Read from the installed metadata, so the check does not import transformers.

These floors match ``pyproject.toml`` (``dependencies`` and the ``model`` / ``test`` extras).
"""

from __future__ import annotations

import importlib.metadata
import re

TORCH_MIN = (2, 5)
TORCH_NEEDS = "torch.library.custom_op with string annotations"
TRANSFORMERS_MIN = (5, 2)
TRANSFORMERS_NEEDS = "masking_utils.create_bidirectional_mask(inputs_embeds=...)"


def version_tuple(version: str) -> tuple[int, ...]:
    """The leading release numbers of a version string: '2.5.0a0+git1a2b' -> (2, 5, 0)."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if m is None:
        raise ValueError(f"not a version number: {version!r}")
    return tuple(int(p) for p in m.group(1).split("."))


def require(package: str, found: str, minimum: tuple[int, ...], needs: str) -> None:
    """Raise ImportError naming ``package >= minimum`` when ``found`` is older."""
    if version_tuple(found) < minimum:
        want = ".".join(str(p) for p in minimum)
        raise ImportError(f"sigma_fast needs {package} >= {want} ({needs}); found {found}")


def check_torch(found: str | None = None) -> None:
    if found is None:
        import torch

        found = torch.__version__
    require("torch", str(found), TORCH_MIN, TORCH_NEEDS)


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_transformers(found: str | None = None) -> None:
    """No-op without transformers (the features that need it raise ModuleNotFoundError)."""
    if found is None:
        found = installed_version("transformers")
    if found is not None:
        require("transformers", found, TRANSFORMERS_MIN, TRANSFORMERS_NEEDS)
