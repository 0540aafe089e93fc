"""Request building (sigma_fast.rec.requests): item lookup by id or title, the TaskSample of a
user or history request, and every rejection with its HTTP status."""

from types import SimpleNamespace

import numpy as np
import pytest

from sigma_fixtures import write_pattern_dataset

from sigma_fast.rec.requests import (ItemLookup, RequestBuilder, RequestError, RequestLimits,
                                     RequestTooLarge, UnknownItem, UnknownUser)


def _catalogue(ids, titles, years=None):
    return SimpleNamespace(item_ids=ids, item_titles=titles,
                           item_years=np.asarray(years if years is not None else [-1] * len(ids)))


# ml-100k style (the id carries the year, the title does not) and ml-1m style (numeric ids,
# the year in the title)
ML100K = _catalogue(["Toy Story (1995)", "Usual Suspects, The (1995)", "Cape Fear (1962)",
                     "Cape Fear (1991)", "Heat (1995)"],
                    ["Toy Story", "Usual Suspects, The", "Cape Fear", "Cape Fear", "Heat"],
                    [1995, 1995, 1962, 1991, 1995])
ML1M = _catalogue(["1", "2", "3"], ["Toy Story (1995)", "Jumanji (1995)", "Heat (1995)"])
# a token_seq title field rendered as a list's text
LISTED = _catalogue(["a", "b"], ["['Toy', 'Story', '(1995)']", "[not, a, list]"])


@pytest.mark.parametrize("ref, want", [
    ("Toy Story (1995)", 0), ("Toy Story", 0), ("toy story", 0), ("  TOY   story ", 0),
    ("Toy Story (1995)", 0), ("The Usual Suspects", 1), ("usual suspects, the", 1),
    ("The Usual Suspects (1995)", 1), ("Usual Suspects", 1), ("usual suspects (1995)", 1),
    ("Cape Fear (1991)", 3), ("cape fear (1962)", 2),
    ("Heat", 4),
])
def test_titles_and_ids_resolve(ref, want):
    assert ItemLookup(ML100K).resolve(ref) == want


@pytest.mark.parametrize("ref, want", [("1", 0), (2, 1), ("Toy Story", 0), ("jumanji", 1),
                                       ("Heat (1995)", 2), ("heat", 2)])
def test_titles_with_the_year_inside(ref, want):
    assert ItemLookup(ML1M).resolve(ref) == want


def test_titles_read_as_token_lists():
    look = ItemLookup(LISTED)
    assert look.resolve("Toy Story") == 0 and look.resolve("toy story (1995)") == 0
    assert look.resolve("[not, a, list]") == 1


def test_unknown_and_ambiguous_titles():
    look = ItemLookup(ML100K)
    with pytest.raises(UnknownItem, match="close matches: 'Toy Story' \\(id 'Toy Story "
                                          "\\(1995\\)'\\)") as e:
        look.resolve("Toy Storry")
    assert e.value.status == 404
    with pytest.raises(UnknownItem, match="close matches: none"):
        look.resolve("Zzzzzz")
    with pytest.raises(RequestError, match="ambiguous.*Cape Fear \\(1962\\).*Cape Fear "
                                           "\\(1991\\).*give the year") as e:
        look.resolve("Cape Fear")
    assert e.value.status == 422
    with pytest.raises(UnknownItem):
        look.resolve("Cape Fear (1990)")       # the year must match
    with pytest.raises(RequestError, match="title or an item id"):
        look.resolve(True)
    with pytest.raises(RequestError, match="title or an item id"):
        look.resolve(["Heat"])


def test_allowed_ids_are_raw_ids_only():
    look = ItemLookup(ML1M)
    np.testing.assert_array_equal(look.resolve_ids(["3", 1, "3"]), [0, 2])
    with pytest.raises(RequestError, match="1 of 2 ids are not in the catalogue.*'Heat'"):
        look.resolve_ids(["1", "Heat"])


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    from sigma_fast.rec.data import load_dataset

    return load_dataset(write_pattern_dataset(tmp_path_factory.mktemp("req") / "pat"),
                        cache_dir=False, max_history=6)


@pytest.fixture(scope="module")
def rb(ds):
    return RequestBuilder(ds, limits=RequestLimits(max_top_n=50, max_history=8))


def test_user_request_is_the_test_sample_with_the_whole_history(ds, rb):
    from sigma_fast.rec.data import build_task_samples

    test = {(s.user, s.task): s for s in build_task_samples(ds, "test")}
    u = ds.user_ids.index("u1")
    for task in rb.user_tasks("u1"):
        base = test[(u, task)]
        s = rb.build(user="u1", task=task)
        assert s.prompt == base.prompt and s.task == task and s.user == u
        np.testing.assert_array_equal(s.history, ds.sequence(u)[-ds.max_history:])
        pool = np.arange(ds.num_items) if base.allowed is None else base.allowed
        np.testing.assert_array_equal(s.allowed, np.setdiff1d(pool, ds.sequence(u)))
        kept = rb.build(user="u1", task=task, exclude_seen=False)
        assert (kept.allowed is None) == (base.allowed is None)
        if base.allowed is not None:
            np.testing.assert_array_equal(kept.allowed, base.allowed)


def test_instruction_and_allowed(ds, rb):
    u = ds.user_ids.index("u2")
    s = rb.build(user="u2", instruction="  Something funny ")
    assert s.prompt.endswith("{items}. Something funny") and "User profile" in s.prompt
    seen = set(ds.sequence(u).tolist())
    free = [ds.item_ids[i] for i in range(ds.num_items) if i not in seen][:3]
    s = rb.build(user="u2", allowed=free + [ds.item_ids[ds.sequence(u)[0]]])
    assert [ds.item_ids[i] for i in s.allowed] == sorted(free, key=ds.item_ids.index)
    # a history request; the titles resolve case-insensitively, ids as given
    s = rb.build(history=["movie number 3", "i4"], task="Longtail")
    np.testing.assert_array_equal(s.history, [3, 4])
    assert s.user == -1 and 3 not in s.allowed and 4 not in s.allowed
    assert set(s.allowed.tolist()) <= set(rb._tail.tolist())
    s = rb.build(history=["i3"], exclude_seen=False)
    assert s.allowed is None and s.prompt.startswith("The user's history")


@pytest.mark.parametrize("kwargs, error, match", [
    ({}, RequestError, "exactly one of user.*got neither"),
    ({"user": "u1", "history": ["i1"]}, RequestError, "got both"),
    ({"user": "nobody"}, UnknownUser, "unknown user 'nobody'"),
    ({"user": "u1", "task": "Categroy"}, RequestError, "did you mean 'Category'"),
    ({"user": "u1", "task": "Discover"}, RequestError, "does not apply to user 'u1'"),
    ({"history": []}, RequestError, "history is empty"),
    ({"history": "i1"}, RequestError, "history must be a list"),
    ({"history": ["i1"] * 9}, RequestTooLarge, "history has 9 items; at most 8"),
    ({"history": ["Movie numbr 3"]}, UnknownItem, "close matches: 'Movie number 3'"),
    ({"history": ["i1"], "task": "Category"}, RequestError, "needs an instruction"),
    ({"user": "u1", "allowed": []}, RequestError, "allowed is empty"),
    ({"user": "u1", "allowed": ["i1", "x9"]}, RequestError, "not in the catalogue.*'x9'"),
    ({"user": "u1", "allowed": ["i1"] * 49}, RequestTooLarge, "allowed has 49 ids; at most 48"),
    ({"user": "u1", "instruction": ""}, RequestError, "instruction must be non-empty"),
    ({"user": "u1", "instruction": "x" * 2001}, RequestTooLarge, "2001 characters"),
])
def test_bad_requests(rb, kwargs, error, match):
    with pytest.raises(error, match=match):
        rb.build(**kwargs)


def test_nothing_left_to_recommend(ds, rb):
    u = ds.user_ids.index("u1")
    seen = [ds.item_ids[i] for i in ds.sequence(u)[:2]]
    with pytest.raises(RequestError, match="no item is left.*exclude_seen"):
        rb.build(user="u1", allowed=seen)
    assert rb.build(user="u1", allowed=seen, exclude_seen=False).allowed.size == 2


@pytest.mark.parametrize("top_n", [0, 51, -1, 2.0, True, "3"])
def test_top_n_range(rb, top_n):
    with pytest.raises(RequestError, match=r"top_n must be an integer in \[1, 50\]"):
        rb.check_top_n(top_n)


def test_statuses_and_task_users(rb):
    assert (UnknownUser.status, UnknownItem.status, RequestTooLarge.status,
            RequestError.status) == (404, 404, 413, 422)
    users = rb.task_users()
    assert "u1" in users["JustForYou"] and users["Discover"] == []
    assert all(t in rb.user_tasks(u) for t, us in users.items() for u in us)
    with pytest.raises(ValueError, match="max_top_n must be >= 1"):
        RequestLimits(max_top_n=0)
