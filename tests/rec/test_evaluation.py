"""HR@k / NDCG@k against hand-computed values, the user bootstrap, the allowed/duplicate checks,
and the Markdown / JSON / PNG report."""

import json
import math
import sys

import numpy as np
import pytest

from sigma_fast.rec.data import TaskSample
from sigma_fast.rec.evaluation import (bootstrap_ci, evaluate_rankings, hit_ndcg,
                                   ranking_violations, results_table, write_results)


def sample(task, user, target, allowed=None, history=(0,)):
    if allowed is not None:
        allowed = np.asarray(sorted(allowed), dtype=np.int32)
    return TaskSample(task, "test", user, 1, "prompt", np.asarray(history, np.int32), target,
                      allowed, 0)


# ------------------------------------------------------------------------------ metrics

def test_hit_ndcg_hand_computed():
    rankings = np.array([[3, 1, 2, -1],    # target 1 at rank 1
                         [0, 1, 2, 3],     # target 3 at rank 3
                         [5, 6, 7, 8],     # target 9 absent
                         [4, -1, -1, -1]])  # target 4 at rank 0
    targets = np.array([1, 3, 9, 4])
    m = hit_ndcg(rankings, targets, (1, 2, 4))
    assert m["HR@1"].tolist() == [0, 0, 0, 1]
    assert m["HR@2"].tolist() == [1, 0, 0, 1]
    assert m["HR@4"].tolist() == [1, 1, 0, 1]
    assert m["HR@1"].dtype == np.float64
    np.testing.assert_allclose(m["NDCG@1"], [0, 0, 0, 1])
    np.testing.assert_allclose(m["NDCG@2"], [1 / math.log2(3), 0, 0, 1])
    np.testing.assert_allclose(m["NDCG@4"], [1 / math.log2(3), 1 / math.log2(5), 0, 1])
    # separate NDCG cut-offs
    m = hit_ndcg(rankings, targets, (1,), ndcg_ks=(4,))
    assert sorted(m) == ["HR@1", "NDCG@4"]


def test_hit_ndcg_padding_never_matches_and_first_hit_counts():
    m = hit_ndcg(np.array([[-1, -1, 2, 2]]), np.array([2]), (4,))
    np.testing.assert_allclose(m["NDCG@4"], [1 / math.log2(4)])


@pytest.mark.parametrize("rankings, targets, ks, match", [
    (np.zeros((2, 3), np.int64), np.zeros(3, np.int64), (1,), "one entry per ranking row"),
    (np.zeros(3, np.int64), np.zeros(3, np.int64), (1,), "2-D"),
    (np.zeros((2, 3), np.int64), np.zeros(2, np.int64), (5,), "only 3 items"),
    (np.zeros((2, 3), np.int64), np.zeros(2, np.int64), (0,), "positive"),
    (np.zeros((2, 3), np.float32), np.zeros(2, np.int64), (1,), "integer"),
    (np.zeros((2, 3), np.int64), np.array([0, -1]), (1,), "sample 1"),
])
def test_hit_ndcg_errors(rankings, targets, ks, match):
    with pytest.raises(ValueError, match=match):
        hit_ndcg(rankings, targets, ks)


# ---------------------------------------------------------------------------- bootstrap

def test_bootstrap_ci_contains_mean_is_seeded_and_narrows():
    rng = np.random.default_rng(0)
    small = (rng.random(30) < 0.3).astype(float)
    mean, lo, hi = bootstrap_ci(small, np.arange(30), n_boot=500, seed=1)
    assert lo[0] <= mean[0] <= hi[0] and lo[0] < hi[0]
    assert mean[0] == pytest.approx(small.mean())
    again = bootstrap_ci(small, np.arange(30), n_boot=500, seed=1)
    other = bootstrap_ci(small, np.arange(30), n_boot=500, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip((mean, lo, hi), again))
    cont = rng.random(30)  # continuous values: another seed moves the percentiles
    assert bootstrap_ci(cont, n_boot=200, seed=1)[1] != bootstrap_ci(cont, n_boot=200, seed=2)[1]
    big = (rng.random(3000) < 0.3).astype(float)
    _, lo_b, hi_b = bootstrap_ci(big, np.arange(3000), n_boot=500, seed=1)
    assert hi_b[0] - lo_b[0] < (hi[0] - lo[0]) / 4


def test_bootstrap_resamples_users_not_samples():
    # 40 users, 10 identical samples each: the effective sample size is 40, not 400.
    user_hits = (np.arange(40) % 3 == 0).astype(float)
    values = np.repeat(user_hits, 10)
    users = np.repeat(np.arange(40), 10)
    _, lo_u, hi_u = bootstrap_ci(values, users, n_boot=1000, seed=0)
    _, lo_s, hi_s = bootstrap_ci(values, None, n_boot=1000, seed=0)
    assert (hi_u - lo_u)[0] > 2 * (hi_s - lo_s)[0]


def test_bootstrap_ci_errors():
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci(np.zeros(0))
    with pytest.raises(ValueError, match="groups"):
        bootstrap_ci(np.zeros(3), np.zeros(2))


# --------------------------------------------------------------------------- evaluation

def crafted():
    samples = [sample("JustForYou", 0, 1), sample("JustForYou", 1, 2),
               sample("Category", 0, 5, allowed=[5, 6, 7]),
               sample("Category", 2, 7, allowed=[5, 6, 7])]
    rankings = np.array([[1, 3, 4], [3, 4, 2], [6, 5, -1], [5, 6, -1]])
    return samples, rankings


def test_evaluate_rankings_structure_and_means():
    samples, rankings = crafted()
    res = evaluate_rankings(samples, rankings, hr_ks=(1, 3), ndcg_ks=(3,), bootstrap=200)
    assert list(res) == ["JustForYou", "Category", "all"]
    jfy = res["JustForYou"]
    assert jfy["n"] == 2 and jfy["users"] == 2
    assert jfy["HR@1"]["mean"] == 0.5 and jfy["HR@3"]["mean"] == 1.0
    assert jfy["NDCG@3"]["mean"] == pytest.approx((1 + 0.5) / 2)
    cat = res["Category"]
    assert cat["HR@1"]["mean"] == 0 and cat["HR@3"]["mean"] == 0.5
    assert cat["NDCG@3"]["mean"] == pytest.approx(1 / math.log2(3) / 2)
    assert res["all"]["n"] == 4 and res["all"]["users"] == 3
    assert res["all"]["HR@3"]["mean"] == 0.75
    for entry in res.values():
        for m in ("HR@1", "HR@3", "NDCG@3"):
            assert entry[m]["lo"] <= entry[m]["mean"] <= entry[m]["hi"]
    json.dumps(res)  # JSON-ready
    assert evaluate_rankings(samples, rankings, hr_ks=(1, 3), ndcg_ks=(3,), bootstrap=200) == res


def test_evaluate_rankings_without_bootstrap():
    samples, rankings = crafted()
    res = evaluate_rankings(samples, rankings, hr_ks=(1,), ndcg_ks=(), bootstrap=0)
    assert res["all"]["HR@1"] == {"mean": 0.25, "lo": None, "hi": None}


def test_evaluate_rankings_per_task_seed_streams():
    # Each task has its own bootstrap stream: adding another task leaves its interval alone.
    rng = np.random.default_rng(0)
    samples = [sample("JustForYou", u, int(rng.integers(5))) for u in range(50)]
    rankings = rng.integers(0, 5, size=(50, 1))
    a = evaluate_rankings(samples, rankings, hr_ks=(1,), ndcg_ks=(), seed=0)
    extra = [sample("Category", u, 1, allowed=[1, 2]) for u in range(7)]
    b = evaluate_rankings(extra + samples, np.concatenate([np.full((7, 1), 2), rankings]),
                          hr_ks=(1,), ndcg_ks=(), seed=0)
    assert a["JustForYou"] == b["JustForYou"]
    assert b["Category"]["HR@1"]["mean"] == 0 and b["all"]["n"] == 57


def test_check_allowed_rejects_outside_items_and_duplicates():
    samples, rankings = crafted()
    bad = rankings.copy()
    bad[3] = [5, 1, -1]  # item 1 is not in sample 3's subset
    with pytest.raises(ValueError, match=r"sample 3 \(Category\).*item 1.*allowed"):
        evaluate_rankings(samples, bad, hr_ks=(1,), ndcg_ks=())
    evaluate_rankings(samples, bad, hr_ks=(1,), ndcg_ks=(), check_allowed=False, bootstrap=10)
    dup = rankings.copy()
    dup[1] = [3, 4, 3]
    with pytest.raises(ValueError, match="sample 1: .*item 3 more than once"):
        evaluate_rankings(samples, dup, hr_ks=(1,), ndcg_ks=())
    neg = rankings.copy()
    neg[0, 2] = -5
    with pytest.raises(ValueError, match="sample 0: .*-5"):
        evaluate_rankings(samples, neg, hr_ks=(1,), ndcg_ks=())


def test_violations_are_counted_and_reported():
    samples, rankings = crafted()
    ok = evaluate_rankings(samples, rankings, hr_ks=(1,), ndcg_ks=(), bootstrap=0)
    assert ok["all"]["illegal"] == 0 and ok["all"]["duplicates"] == 0
    bad = rankings.copy()
    bad[3] = [5, 1, 1]          # item 1 is outside sample 3's subset, and repeated
    bad[1] = [3, 4, 3]          # a duplicate
    bad[0, 2] = -5              # not a padding value
    assert ranking_violations(samples, bad) == {"illegal": 3, "duplicates": 2}
    res = evaluate_rankings(samples, bad, hr_ks=(1,), ndcg_ks=(), bootstrap=0,
                            check_allowed=False)
    assert (res["all"]["illegal"], res["all"]["duplicates"]) == (3, 2)


def test_evaluate_rankings_errors():
    samples, rankings = crafted()
    with pytest.raises(ValueError, match="one row per sample"):
        evaluate_rankings(samples[:3], rankings)
    with pytest.raises(ValueError, match="only 3 items"):
        evaluate_rankings(samples, rankings)  # default HR@5..20 need deeper rankings
    with pytest.raises(ValueError, match="no samples"):
        evaluate_rankings([], np.zeros((0, 20), np.int64))


# ------------------------------------------------------------------------------ reports

def two_methods():
    samples, rankings = crafted()
    kw = dict(hr_ks=(1, 3), ndcg_ks=(3,), bootstrap=100)
    worse = np.array([[3, 4, 0], [3, 4, 0], [6, -1, -1], [6, -1, -1]])
    return {"Good": evaluate_rankings(samples, rankings, **kw),
            "Bad": evaluate_rankings(samples, worse, **kw)}


def test_results_table_format():
    entry = {"HR@1": {"mean": 0.5, "lo": 0.4, "hi": 0.6}, "n": 10, "users": 7}
    table = results_table({"M": {"JustForYou": entry, "all": entry}}, metrics=("HR@1",))
    lines = table.strip().splitlines()
    assert lines[0] == "| Task | Method | n | users | HR@1 (%) |"
    assert lines[2] == "| JustForYou | M | 10 | 7 | 50.00 ± 10.00 |"
    assert lines[3].startswith("| all | M |")
    # a single method's results are accepted as they are
    assert "50.00 ± 10.00" in results_table({"JustForYou": entry}, metrics=("HR@1",))
    table = results_table(two_methods(), metrics=("HR@1", "HR@3"))
    assert "| JustForYou | Good | 2 | 2 | **50.00" in table
    assert "| JustForYou | Bad | 2 | 2 | 0.00" in table
    with pytest.raises(ValueError, match="method names"):
        results_table({"M": {"JustForYou": {"HR@1": 1}}})


def test_write_results(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed: the PNG charts are skipped")
    res = two_methods()
    paths = write_results(res, tmp_path / "out", title="Crafted")
    names = sorted(p.name for p in paths)
    assert names == ["hr_Category.png", "hr_JustForYou.png", "hr_all.png", "results.json",
                     "results.md"]
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == json.loads(
        json.dumps(res))
    md = (tmp_path / "out" / "results.md").read_text()
    assert md.startswith("# Crafted\n") and "| Category | Bad |" in md
    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_write_results_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.warns(UserWarning, match="pip install matplotlib"):
        paths = write_results(two_methods(), tmp_path)
    assert sorted(p.name for p in paths) == ["results.json", "results.md"]
    assert not list(tmp_path.glob("*.png"))


def test_paired_difference_is_the_difference_of_means_with_a_narrower_interval():
    from sigma_fast.rec.evaluation import paired_difference

    rng = np.random.default_rng(0)
    samples = [sample("JustForYou" if i % 2 else "Query", i % 50, int(rng.integers(20)))
               for i in range(400)]
    a = np.stack([rng.permutation(20)[:10] for _ in samples])
    b = a.copy()
    b[::3] = np.roll(b[::3], 1, axis=1)          # b differs from a on a third of the rows
    res = paired_difference(samples, a, b, k=10, n_boot=300)
    ea = evaluate_rankings(samples, a, hr_ks=(10,), ndcg_ks=(10,), bootstrap=300)
    eb = evaluate_rankings(samples, b, hr_ks=(10,), ndcg_ks=(10,), bootstrap=300)
    for task in ("Query", "JustForYou", "all"):
        for m in ("HR@10", "NDCG@10"):
            d = res[task][m]
            assert d["mean"] == pytest.approx(ea[task][m]["mean"] - eb[task][m]["mean"])
            assert d["lo"] <= d["mean"] <= d["hi"]
            assert d["hi"] - d["lo"] < ea[task][m]["hi"] - ea[task][m]["lo"]
    same = paired_difference(samples, a, a, n_boot=50)
    assert same["all"]["HR@10"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0}
    with pytest.raises(ValueError, match="one row per sample"):
        paired_difference(samples, a[:5], b)
