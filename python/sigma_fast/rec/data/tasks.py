"""The seven SIGMA instruction tasks (DESIGN.md §1.3) built from a :class:`RecDataset`.

Every sample is (task, prompt, history, target, allowed subset). The prompt is plain text with one
``{items}`` placeholder where the history goes; the tokenizer layer renders each history item
(e.g. as ``<prefix_k> <item>``) with :func:`render_prompt`. Histories are item indices, oldest
first, capped at ``dataset.max_history``.

Rules (a task yields a sample at a target only when its rule holds there):

- **JustForYou** — the personal next item; always applies. No subset.
- **Query** — a search query built from the target's genres and era (decade of its year), never
  its title; applies when the target has a genre or a year. No subset (the query is soft).
- **Category** — names one of the target's genres (picked deterministically from the seed, user
  and position); the allowed subset is every item of that genre.
- **Longtail** — *head* = the ``head_fraction`` (default 20%) of the catalogue with the most
  training-split interactions (ties: smaller item index is more popular; items never seen in
  training are never head). Applies when the target is not head; the subset is all non-head items.
- **Discover** — *recent genres* = the genres of the last ``recent`` (default 5) history items.
  Applies when these are non-empty and the target has genres, none of them recent; the subset is
  every item that has genres and none of the recent ones. The prompt names the recent genres.
- **Season** — the target's timestamp (UTC) gives the month, hence the (northern-hemisphere,
  meteorological) season: Dec–Feb winter, Mar–May spring, Jun–Aug summer, Sep–Nov autumn.
  Applies whenever the dataset has timestamps. No subset.
- **Holiday** — applies when the target's UTC date lies in one of the windows of :data:`HOLIDAYS`
  (Valentine's Day Feb 7–14, Independence Day Jul 1–4, Halloween Oct 24–31, Thanksgiving the six
  days before the fourth Thursday of November and that day, Christmas Dec 18–26, New Year Dec 30–
  Jan 1); the prompt names the holiday. No subset.

Training samples come from the training split only: for every user and every position ``t >= 1``
of the training sequence, the target is item ``t`` and the history the items before it. Evaluation
samples have the validation target (history: the training sequence) or the test target (history:
training sequence + validation target). Popularity for Longtail counts training interactions only.
Template and Category-genre choices are a deterministic hash of (seed, task, user, position).
"""

from __future__ import annotations

import dataclasses

import datetime as _dt
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..._io import atomic_write_json
from .dataset import RecDataset

TASKS = ("JustForYou", "Query", "Category", "Longtail", "Discover", "Season", "Holiday")
HISTORY_PLACEHOLDER = "{items}"
SPLITS = ("train", "valid", "test")

TEMPLATES: dict[str, tuple[str, ...]] = {
    "JustForYou": (
        "Recommend the next item this user will enjoy.",
        "Based on this history, which item will the user choose next?",
        "Pick one item just for this user.",
    ),
    "Query": (
        'The user searches for "{query}". Recommend a matching item.',
        "Find an item for this request: {query}.",
        'Which item best answers the query "{query}" for this user?',
    ),
    "Category": (
        "Recommend a {genre} item for this user.",
        "The user wants something in the {genre} category. What should they pick?",
        "Suggest one {genre} item this user will like.",
    ),
    "Longtail": (
        "Recommend a lesser-known item this user will like, not one of the popular hits.",
        "Suggest a hidden gem for this user: an item outside the most popular ones.",
        "Find a niche item, off the beaten track, that suits this user.",
    ),
    "Discover": (
        "Recommend something new for this user, outside the {recent} they have been into lately.",
        "Help the user discover an item unlike their recent {recent} choices.",
        "Suggest an item with none of the genres {recent} that the user saw recently.",
    ),
    "Season": (
        "It is {season}. Recommend an item for this user that fits the season.",
        "What should this user pick this {season}?",
        "Suggest a {season} item for this user.",
    ),
    "Holiday": (
        "{holiday} is coming. Recommend an item for this user for {holiday}.",
        "Suggest an item this user will enjoy around {holiday}.",
        "What would this user pick for {holiday}?",
    ),
}

_SEASONS = ("winter", "winter", "spring", "spring", "spring", "summer", "summer", "summer",
            "autumn", "autumn", "autumn", "winter")


def _thanksgiving(year: int) -> _dt.date:
    first = _dt.date(year, 11, 1)
    return first + _dt.timedelta(days=(3 - first.weekday()) % 7 + 21)


def _window(m0, d0, m1, d1):
    return lambda d: (m0, d0) <= (d.month, d.day) <= (m1, d1)


# (name, predicate on the UTC date); the first match wins.
HOLIDAYS: tuple[tuple[str, Callable[[_dt.date], bool]], ...] = (
    ("New Year", lambda d: (d.month, d.day) >= (12, 30) or (d.month, d.day) == (1, 1)),
    ("Valentine's Day", _window(2, 7, 2, 14)),
    ("Independence Day", _window(7, 1, 7, 4)),
    ("Halloween", _window(10, 24, 10, 31)),
    ("Thanksgiving", lambda d: d.month == 11
        and 0 <= (_thanksgiving(d.year) - d).days <= 6),
    ("Christmas", _window(12, 18, 12, 26)),
)


def season_of(timestamp: float) -> str:
    """Season of a Unix timestamp's UTC date."""
    return _season_of_day(int(timestamp // 86400))


def holiday_of(timestamp: float) -> str | None:
    """The holiday window of :data:`HOLIDAYS` a Unix timestamp's UTC date falls in, or None."""
    return _holiday_of_day(int(timestamp // 86400))


_EPOCH = _dt.date(1970, 1, 1)


@functools.lru_cache(maxsize=1 << 16)
def _season_of_day(day: int) -> str:
    return _SEASONS[(_EPOCH + _dt.timedelta(days=day)).month - 1]


@functools.lru_cache(maxsize=1 << 16)
def _holiday_of_day(day: int) -> str | None:
    d = _EPOCH + _dt.timedelta(days=day)
    for name, inside in HOLIDAYS:
        if inside(d):
            return name
    return None


@dataclass(slots=True)
class TaskSample:
    """One instruction sample (treat as immutable). ``position`` is the target's index in the
    user's whole sequence (``dataset.sequence(user)``); ``history`` is a read-only view of the items before it (at most
    ``max_history``). ``allowed`` is None or a sorted, read-only int32 array of item indices
    (shared between samples) that contains the target. ``template`` indexes
    ``TEMPLATES[task]``; ``params`` holds the values filled into it
    (e.g. ``{"genre": "Drama"}``)."""

    task: str
    split: str
    user: int
    position: int
    prompt: str
    history: np.ndarray
    target: int
    allowed: np.ndarray | None
    template: int
    params: dict[str, str] | None = None  # what the instruction names: genre, query, season...


def render_prompt(sample: TaskSample, render_item: Callable[[int], str], sep: str = " ") -> str:
    """The prompt with ``{items}`` replaced by ``render_item(i)`` for each history item."""
    return sample.prompt.replace(HISTORY_PLACEHOLDER,
                                 sep.join(render_item(int(i)) for i in sample.history))


def _mix(*values: int) -> int:
    """A deterministic 64-bit hash of small ints (splitmix64 steps)."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
        x = x * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x


def _frozen(a) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.int32)
    a.flags.writeable = False
    return a


class _Context:
    """Per-dataset tables the rules share (popularity, genre subsets), built once."""

    def __init__(self, ds: RecDataset, head_fraction: float, recent: int):
        self.ds = ds
        self.recent = recent
        self.genre_cols = [np.flatnonzero(row).tolist() for row in ds.item_genre_mask]
        pop = ds.train_popularity()
        order = np.lexsort((np.arange(ds.num_items), -pop))
        n_head = min(int(np.ceil(head_fraction * ds.num_items)), int((pop > 0).sum()))
        self.is_head = np.zeros(ds.num_items, dtype=bool)
        self.is_head[order[:n_head]] = True
        self.tail = _frozen(np.flatnonzero(~self.is_head))
        self.is_head = self.is_head.tolist()
        self.has_genre = ds.item_genre_mask.any(1)
        self.eras = [_era(int(y)) for y in ds.item_years]
        self.genre_lower = [g.lower() for g in ds.genre_names]
        self._by_genre: dict[int, np.ndarray] = {}
        self._discover: dict[frozenset, np.ndarray] = {}

    def genre_items(self, g: int) -> np.ndarray:
        if g not in self._by_genre:
            self._by_genre[g] = _frozen(np.flatnonzero(self.ds.item_genre_mask[:, g]))
        return self._by_genre[g]

    def discover_items(self, recent: frozenset) -> np.ndarray:
        if recent not in self._discover:
            cols = sorted(recent)
            ok = self.has_genre & ~self.ds.item_genre_mask[:, cols].any(1)
            self._discover[recent] = _frozen(np.flatnonzero(ok))
        return self._discover[recent]


def _profile_text(profile: dict[str, str]) -> str:
    if not profile:
        return ""
    return "User profile: " + ", ".join(f"{k.replace('_', ' ')} {v}"
                                        for k, v in profile.items()) + ". "


def _era(year: int) -> str | None:
    return f"{year // 10 * 10}s" if year > 0 else None


def _samples_at(ctx: _Context, tasks: tuple[int, ...], split: str, user: int, position: int,
                seq: np.ndarray, days: list[int], head: str, seed: int) -> Iterator[TaskSample]:
    ds = ctx.ds
    history = seq[max(0, position - ds.max_history):position]
    target = int(seq[position])
    tcols = ctx.genre_cols[target]
    h = _mix(seed, user, position)  # bits 8*ti.. pick task ti's template; bits 56.. the genre
    for ti in tasks:
        task = TASKS[ti]
        fill = None
        allowed = None
        if ti == 1:  # Query
            era = ctx.eras[target]
            if not tcols and era is None:
                continue
            genres = " and ".join(ctx.genre_lower[g] for g in tcols[:3])
            fill = ("{query}", f"{genres} from the {era}" if genres and era
                    else genres or f"something from the {era}")
        elif ti == 2:  # Category
            if not tcols:
                continue
            g = tcols[(h >> 56) % len(tcols)]
            fill = ("{genre}", ds.genre_names[g])
            allowed = ctx.genre_items(g)
        elif ti == 3:  # Longtail
            if ctx.is_head[target]:
                continue
            allowed = ctx.tail
        elif ti == 4:  # Discover
            gc = ctx.genre_cols
            recent = frozenset(g for i in history[-ctx.recent:].tolist() for g in gc[i])
            if not recent or not tcols or not recent.isdisjoint(tcols):
                continue
            fill = ("{recent}", ", ".join(ds.genre_names[g] for g in sorted(recent)))
            allowed = ctx.discover_items(recent)
        elif ti == 5:  # Season
            if not ds.has_timestamps:
                continue
            fill = ("{season}", _season_of_day(days[position]))
        elif ti == 6:  # Holiday
            name = ds.has_timestamps and _holiday_of_day(days[position])
            if not name:
                continue
            fill = ("{holiday}", name)
        templates = TEMPLATES[task]
        k = (h >> (8 * ti)) % len(templates)
        if fill is None:
            instruction, params = templates[k], None
        else:
            instruction, params = templates[k].replace(*fill), {fill[0][1:-1]: fill[1]}
        yield TaskSample(task, split, user, position, head + instruction, history, target,
                         allowed, k, params)


def iter_task_samples(ds: RecDataset, split: str = "train", tasks=TASKS, *, seed: int = 0,
                      head_fraction: float = 0.2, recent: int = 5,
                      max_per_user: int | None = None) -> Iterator[TaskSample]:
    """Samples of ``tasks`` on ``split`` ("train", "valid" or "test"), user by user.

    ``max_per_user`` (train only) keeps each user's most recent training positions.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; expected names from {TASKS}")
    if not 0.0 <= head_fraction < 1.0:
        raise ValueError(f"head_fraction must be in [0, 1); got {head_fraction!r}")
    if recent < 1:
        raise ValueError(f"recent must be >= 1; got {recent!r}")
    if max_per_user is not None and max_per_user < 1:
        raise ValueError(f"max_per_user must be None or >= 1; got {max_per_user!r}")
    task_ids = tuple(i for i, t in enumerate(TASKS) if t in tasks)
    ctx = _Context(ds, head_fraction, recent)
    # UTC day numbers of every interaction (Season / Holiday are functions of the day).
    all_days = np.floor_divide(ds.seq_times, 86400.0).astype(np.int64)
    for u in range(ds.num_users):
        lo, hi = int(ds.seq_offsets[u]), int(ds.seq_offsets[u + 1])
        seq, days = ds.seq_items[lo:hi], all_days[lo:hi].tolist()
        head = (f"{_profile_text(ds.user_profiles[u])}The user's history, oldest first: "
                f"{HISTORY_PLACEHOLDER}. ")
        if split == "train":
            n = int(ds.n_train[u])
            first = 1 if max_per_user is None else max(1, n - max_per_user)
            positions = range(first, n)
        else:
            p = ds.eval_position(u, split)
            positions = (p,) if p >= 1 else ()
        for p in positions:
            yield from _samples_at(ctx, task_ids, split, u, p, seq, days, head, seed)


def build_task_samples(ds: RecDataset, split: str = "train", tasks=TASKS, **kwargs
                       ) -> list[TaskSample]:
    """All samples of :func:`iter_task_samples` as a list."""
    return list(iter_task_samples(ds, split, tasks, **kwargs))


def exclude_seen(samples, ds: RecDataset, *, last: int | None = None) -> list[TaskSample]:
    """The samples with every item the user consumed before the target (the whole sequence up
    to ``position``, not only the rendered history) removed from the allowed subset (from the
    whole catalogue for tasks without one) — the usual protocol of next-item evaluation, where
    a recommender is not credited or blamed for items the user already has. The target itself
    stays allowed (a repeat consumption, which MovieLens does not have, stays winnable).
    ``last`` removes only the user's ``last`` items before the target (a sequential model's
    input window, as some published protocols do)."""
    if last is not None and (not isinstance(last, (int, np.integer)) or isinstance(last, bool)
                             or last < 1):
        raise ValueError(f"last must be a positive int or None; got {last!r}")
    out = []
    catalogue = np.arange(ds.num_items, dtype=np.int32)
    for s in samples:
        seen = ds.sequence(s.user)[:s.position]
        if last is not None:
            seen = seen[-last:]
        base = catalogue if s.allowed is None else np.asarray(s.allowed, dtype=np.int32)
        keep = ~np.isin(base, seen) | (base == s.target)
        allowed = base[keep]
        allowed.setflags(write=False)
        out.append(dataclasses.replace(s, allowed=allowed))
    return out


def task_statistics(samples, *, path: str | os.PathLike | None = None,
                    verbose: bool = False) -> dict:
    """Per task: number of samples and users, templates used, and allowed-subset sizes
    (min / mean / max, or None when the task has no subset). Saved as JSON to ``path`` (atomic)
    and printed as a table when ``verbose``."""
    acc: dict[str, dict] = {t: {"samples": 0, "users": set(), "templates": set(), "sizes": []}
                            for t in TASKS}
    splits = set()
    for s in samples:
        a = acc[s.task]
        a["samples"] += 1
        a["users"].add(s.user)
        a["templates"].add(s.template)
        splits.add(s.split)
        if s.allowed is not None:
            a["sizes"].append(len(s.allowed))
    stats: dict = {"splits": sorted(splits), "tasks": {}}
    for t, a in acc.items():
        sizes = np.asarray(a["sizes"], dtype=np.float64)
        stats["tasks"][t] = {
            "samples": a["samples"], "users": len(a["users"]),
            "templates_used": sorted(a["templates"]),
            "allowed_size": None if sizes.size == 0 else {
                "min": int(sizes.min()), "mean": round(float(sizes.mean()), 2),
                "max": int(sizes.max())},
        }
    stats["total_samples"] = sum(a["samples"] for a in acc.values())
    if verbose:
        print(f"{'task':12s} {'samples':>9s} {'users':>7s}  allowed subset size (min/mean/max)")
        for t, st in stats["tasks"].items():
            al = st["allowed_size"]
            al = "-" if al is None else f"{al['min']} / {al['mean']} / {al['max']}"
            print(f"{t:12s} {st['samples']:9d} {st['users']:7d}  {al}")
        print(f"{'total':12s} {stats['total_samples']:9d}")
    if path is not None:
        atomic_write_json(path, stats)
    return stats
