"""The training options of the SIGMA loss: catalogue negatives (optionally restricted to the
sample's allowed subset) and dense history supervision, each checked against an explicit
recomputation from the model's hidden states; and their round trip through save/load."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sigma_fixtures import needs_minilm, pattern_setup

pytestmark = needs_minilm


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from sigma_fast.rec.data import build_task_samples

    ds, items = pattern_setup(tmp_path_factory.mktemp("losses"))
    return ds, items, build_task_samples(ds, "train")


def _model(items, mode="sigma", **config):
    from sigma_fast.rec.model import SigmaModel

    items = items.variant()
    return SigmaModel.from_preset("tiny", items, mode=mode, hidden_size=32, max_history=6,
                                  **config)


def _loss_and_logits(model, samples):
    """The model's losses on ``samples`` and the <q>-vs-catalogue logits [B, N] they use."""
    batch = model.collate([model.encode(s) for s in samples])
    with torch.no_grad():
        out = model(batch)
        hidden = model._hidden(batch)
        q = model.query_embeddings(hidden[torch.arange(len(samples)), batch["label_pos"] + 1])
        v = F.normalize(model.item_embeddings(), dim=-1)
    return batch, out, q @ v.T / model.config.tau


def test_catalogue_negatives_are_a_softmax_over_every_item(setup):
    _, items, train = setup
    model = _model(items, negatives="catalogue", nce_weight=1.0)
    batch, out, logits = _loss_and_logits(model, train[:8])
    expect = F.cross_entropy(logits, batch["target"])
    torch.testing.assert_close(out["nce"], expect)
    torch.testing.assert_close(out["loss"], out["ntp"] + expect)


def test_subset_negatives_only_compete_inside_the_allowed_subset(setup):
    _, items, train = setup
    model = _model(items, negatives="catalogue", subset_negatives=True)
    samples = [s for s in train if s.allowed is not None][:4] + \
        [s for s in train if s.allowed is None][:2]
    assert len(samples) == 6 and len(samples[0].allowed) < model.num_items
    _, out, logits = _loss_and_logits(model, samples)
    terms = []
    for r, s in enumerate(samples):
        keep = np.arange(model.num_items) if s.allowed is None else np.asarray(s.allowed)
        row = logits[r, torch.from_numpy(keep.astype(np.int64))]
        terms.append(torch.logsumexp(row, 0) - logits[r, s.target])
    expect = torch.stack(terms).mean()
    torch.testing.assert_close(out["nce"], expect)
    # the restriction matters: the unrestricted softmax gives a larger loss
    model.config.subset_negatives = False
    with torch.no_grad():
        full = model(model.collate([model.encode(s) for s in samples]))
    assert float(full["nce"]) > float(out["nce"])


def test_subset_weight_adds_a_softmax_inside_the_allowed_subset(setup):
    _, items, train = setup
    samples = [s for s in train if s.allowed is not None][:3] + \
        [s for s in train if s.allowed is None][:3]
    base = _model(items)
    model = _model(items, subset_weight=0.5)
    model.load_state_dict(base.state_dict())
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731  (same hard negatives)
    batch = model.collate([model.encode(s) for s in samples])
    with torch.no_grad():
        plain = base(base.collate([base.encode(s) for s in samples]), generator=g())
        out = model(batch, generator=g())
    _, _, logits = _loss_and_logits(model, samples)
    terms = [torch.logsumexp(logits[r, torch.from_numpy(np.asarray(s.allowed, np.int64))], 0)
             - logits[r, s.target] for r, s in enumerate(samples[:3])]
    expect = torch.stack(terms).mean()  # only the samples with a subset
    torch.testing.assert_close(out["subset"], expect)
    torch.testing.assert_close(out["nce"], plain["nce"])
    torch.testing.assert_close(out["loss"], plain["loss"] + 0.5 * expect)


@pytest.mark.parametrize("mode", ["sigma", "gr_id", "gr_sid"])
def test_dense_supervision_predicts_every_history_item(setup, mode):
    _, items, train = setup
    model = _model(items, mode=mode, dense_weight=0.5, negatives="catalogue")
    samples = [s for s in train if len(s.history) >= 4][:5]
    encoded = [model.encode(s) for s in samples]
    batch = model.collate(encoded)
    n_dense = sum(min(len(s.history), 6) - 1 for s in samples)
    assert batch["dense_items"].shape == (n_dense,)
    with torch.no_grad():
        out = model(batch)
        hidden = model._hidden(batch)
        ntp, nce = [], []
        v = F.normalize(model.item_embeddings(), dim=-1)
        for r, e in enumerate(encoded):
            for start, item in zip(e.history_starts[1:], e.history_items[1:]):
                levels = 0 if mode == "gr_id" else model.codes.shape[1]
                # the item's tokens in the prompt are its SID (prefix) tokens
                if levels:
                    sid = e.input_ids[start:start + levels]
                    assert sid == model.vocab.token_ids(model.codes[item]).tolist()
                    ntp.append(sum(F.cross_entropy(model.sid_logits(hidden[r, start + lv - 1],
                                                                    lv)[None],
                                                   model.codes[item, lv][None])
                                   for lv in range(levels)) / levels)
                if mode != "gr_sid":
                    q = model.query_embeddings(hidden[r, start + levels - 1])
                    nce.append(F.cross_entropy((q @ v.T / model.config.tau)[None],
                                               torch.tensor([item])))
        expect = (torch.stack(ntp).mean() if ntp else 0) + (torch.stack(nce).mean() if nce else 0)
    torch.testing.assert_close(out["dense"], torch.as_tensor(expect, dtype=out["dense"].dtype))
    base = out["loss"] - 0.5 * out["dense"]
    torch.testing.assert_close(base, out["ntp"] + out["nce"])


def test_dense_off_adds_nothing_and_first_item_is_not_a_target(setup):
    _, items, train = setup
    model = _model(items)
    s = next(x for x in train if len(x.history) >= 3)
    batch = model.collate([model.encode(s)])
    assert "dense_items" not in batch and "dense" not in model(batch)
    dense = _model(items, dense_weight=1.0)
    b = dense.collate([dense.encode(s)])
    assert b["dense_items"].tolist() == np.asarray(s.history)[-6:][1:].tolist()


def test_training_options_round_trip_and_are_checked(setup, tmp_path):
    from sigma_fast.rec.model import SigmaConfig, SigmaModel

    _, items, _ = setup
    model = _model(items, dense_weight=0.25, negatives="catalogue", subset_negatives=True,
                   trainable_ids=True)
    assert torch.equal(model.item_embeddings(), model.items.item_embeddings(
        torch.arange(model.num_items)))                  # the residual starts at zero
    with torch.no_grad():
        model.id_residual.weight.normal_()
    model.save_pretrained(tmp_path / "m")
    loaded = SigmaModel.from_pretrained(tmp_path / "m")
    assert dataclasses.asdict(loaded.config) == dataclasses.asdict(model.config)
    torch.testing.assert_close(loaded.item_embeddings(), model.item_embeddings())
    assert not torch.equal(model.item_embeddings(), model.items.item_embeddings(
        torch.arange(model.num_items)))
    with pytest.raises(ValueError, match="negatives must be one of"):
        SigmaConfig(negatives="everything").check()
    with pytest.raises(ValueError, match="dense_weight"):
        SigmaConfig(dense_weight=-1.0).check()


def test_lora_trains_adapters_and_embeddings_only_and_saves_merged(setup, tmp_path):
    """LoRA (peft) on the backbone: only the adapters, the token embeddings (new SID tokens),
    Proj&Fuse and the query head train; the saved model holds the merged weights and generates
    exactly what the adapted model generates."""
    pytest.importorskip("peft", reason="LoRA needs the peft package (the [lora] extra)")
    from sigma_fast.rec.generate import recommend
    from sigma_fast.rec.model import SigmaModel

    _, items, train = setup
    model = _model(items, lora_rank=4, lora_layers=1)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trained) and any("lora_B" in n for n in trained)
    assert not any("lora_" in n and ".layers.1." in n for n in trained)  # first layer only
    assert any("embed_tokens" in n for n in trained)
    assert all("lora_" in n or "embed_tokens" in n or n.startswith(("proj_fuse", "query_head"))
               for n in trained), sorted(trained)
    frozen = model.backbone.base_model.layers[0].self_attn.q_proj.base_layer.weight
    before = frozen.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        batch = model.collate([model.encode(s) for s in train[:8]])
        model(batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(frozen, before)
    model.eval()
    samples = [s for s in train if s.allowed is None][:4]
    a = recommend(model, samples, top_n=5, num_beams=3, top_m=5)
    model.save_pretrained(tmp_path / "lora")
    loaded = SigmaModel.from_pretrained(tmp_path / "lora")
    assert loaded.config.lora_rank == 4 and loaded._peft is None
    assert not any("lora_" in n for n, _ in loaded.named_parameters())
    b = recommend(loaded, samples, top_n=5, num_beams=3, top_m=5)
    assert torch.equal(a.item_ids, b.item_ids)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="LoRA rank"):
        _model(items).enable_lora(0)
