"""The transformers version shims (sigma_fast._hf): one place for every keyword that moved."""

import inspect

import pytest
import torch

from sigma_fast import _hf


def test_causal_mask_kwargs_follow_the_installed_transformers_names():
    """create_causal_mask renamed its arguments across transformers releases; the shim passes
    the names of the installed version (these signatures mirror three of them)."""
    def new(config, inputs_embeds, attention_mask, cache=None, position_ids=None): ...

    def mid(config, inputs_embeds, attention_mask, past_key_values, position_ids=None): ...

    def old(config, input_embeds, attention_mask, cache_position, past_key_values,
            position_ids=None): ...

    emb, mask, pos = torch.zeros((2, 5, 3)), torch.ones((2, 5)), torch.zeros((2, 5))
    got = {f.__name__: _hf.causal_mask_kwargs(f, config="c", embeds=emb, attention_mask=mask,
                                          position_ids=pos)
           for f in (new, mid, old)}
    assert set(got["new"]) == {"config", "inputs_embeds", "attention_mask", "cache",
                               "position_ids"} and got["new"]["cache"] is None
    assert set(got["mid"]) == {"config", "inputs_embeds", "attention_mask", "past_key_values",
                               "position_ids"}
    assert set(got["old"]) == {"config", "input_embeds", "attention_mask", "cache_position",
                               "past_key_values", "position_ids"}
    assert got["old"]["cache_position"].tolist() == [0, 1, 2, 3, 4]
    for f in (new, mid, old):  # every set binds to its signature
        inspect.signature(f).bind(**got[f.__name__])



def test_position_ids_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert _hf.position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4],
                                               [0, 1, 2, 2, 2]]


def test_cache_kwarg_and_output_cache_follow_the_forward_signature():
    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None):  # transformers >= 5.x
            ...

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            ...

    assert _hf.cache_kwarg(New()) == "cache" and _hf.cache_kwarg(Old()) == "past_key_values"

    class Out:
        cache = None
        past_key_values = "pkv"

    assert _hf.output_cache(Out()) == "pkv"
    Out.cache = "c"
    assert _hf.output_cache(Out()) == "c"


def test_offline_respects_an_explicit_setting(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    _hf.offline()
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    _hf.offline()
    assert os.environ["HF_HUB_OFFLINE"] == "0"


def test_from_pretrained_kwargs_name_the_dtype():
    pytest.importorskip("transformers")
    kw = _hf.from_pretrained_kwargs(torch.float32)
    assert list(kw.values()) == [torch.float32] and set(kw) <= {"dtype", "torch_dtype"}
