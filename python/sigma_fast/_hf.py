"""Every difference between Hugging Face transformers versions that sigma_fast meets, in one place.

transformers is imported lazily (inside the functions), so ``import sigma_fast`` does not import
it. Callers ask this module instead of spelling a keyword or an attribute themselves:

- the KV cache argument of a forward (``cache`` in transformers >= 5.x, ``past_key_values``
  before) and the cache a forward returns;
- position ids that count real tokens only (the convention of ``generate``);
- the keyword arguments of ``create_causal_mask`` (renamed between versions);
- reading models offline (``HF_HUB_OFFLINE``) and without per-file progress bars;
- the dtype keyword of ``from_pretrained`` (``dtype``, formerly ``torch_dtype``);
- loading a folder without running code from it (``local_model_kwargs`` /
  ``local_tokenizer_kwargs``).

Importing this module checks the installed transformers against the oldest version sigma_fast
supports (``_compat.TRANSFORMERS_MIN``).
"""

from __future__ import annotations

import inspect
import os

import torch

from ._compat import check_transformers

check_transformers()  # from the installed metadata: transformers itself is not imported here

__all__ = ["cache_kwarg", "causal_mask_kwargs", "forward_params", "from_pretrained_kwargs",
           "local_model_kwargs", "local_tokenizer_kwargs", "offline", "output_cache",
           "position_ids", "quiet"]


def offline() -> None:
    """Never reach a model hub: every model sigma_fast reads ships in an installed package or a
    local folder (a user's explicit ``HF_HUB_OFFLINE=0`` is respected)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def forward_params(module) -> set[str]:
    """Names of the parameters of ``module.forward`` (empty when it cannot be inspected)."""
    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return set()


def cache_kwarg(module) -> str:
    """The name under which ``module``'s forward takes a KV cache."""
    return "cache" if "cache" in forward_params(module) else "past_key_values"


def output_cache(out):
    """The KV cache a forward returned (``out.cache`` or ``out.past_key_values``), or None."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only (``cumsum(mask) - 1``; padding gets 0), as
    ``generate`` assigns them: a prompt's positions then do not depend on its padding."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def causal_mask_kwargs(fn, *, config, embeds, attention_mask, position_ids) -> dict:
    """Keyword arguments of transformers' ``create_causal_mask`` for a forward without a KV
    cache, in the names this version uses (the embeddings were ``input_embeds`` then
    ``inputs_embeds``; the cache ``past_key_values`` then ``cache``; some versions also take
    ``cache_position``)."""
    params = inspect.signature(fn).parameters
    kwargs = {"config": config, "attention_mask": attention_mask, "position_ids": position_ids}
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = embeds
    for name in ("cache", "past_key_values"):  # the current name only (the old one warns)
        if name in params:
            kwargs[name] = None
            break
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(embeds.shape[1], device=embeds.device)
    return kwargs


def from_pretrained_kwargs(dtype: torch.dtype) -> dict:
    """The dtype keyword of ``from_pretrained`` for this transformers version."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def local_model_kwargs(dtype: torch.dtype) -> dict:
    """``from_pretrained`` keywords for a model folder that may come from anyone (a run
    directory): weights from safetensors only (a ``pytorch_model.bin`` is a pickle and is never
    read), no code from the folder (``trust_remote_code=False``), and the dtype."""
    return {**from_pretrained_kwargs(dtype), "use_safetensors": True,
            "trust_remote_code": False}


def local_tokenizer_kwargs() -> dict:
    """``AutoTokenizer.from_pretrained`` keywords for a folder that may come from anyone: no
    code from the folder."""
    return {"trust_remote_code": False}


class quiet:
    """Silence transformers' per-file progress bars ("Loading weights", "Writing model
    shards") for the duration of a load or save; restores the previous setting."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._log = hf_logging
        self._was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        if self._was:
            self._log.enable_progress_bar()
