"""Recommendation requests to a trained run, turned into :class:`TaskSample` prompts: the one
place where a user id or a history of titles / item ids, a task or a free-form instruction, an
allowed subset and the "exclude what the user has seen" rule become a model input. The command
line (``sigma-fast recommend``), the HTTP server and the batch-offline job all go through it, so
they cannot drift apart.

>>> rb = RequestBuilder(ds)                                   # ds: the run's RecDataset
>>> s = rb.build(user="100k_196", task="Category")            # the user's test-split Category
>>> s = rb.build(history=["Toy Story", "Heat (1995)"], instruction="Something funny")
>>> s = rb.build(user="100k_196", allowed=["Fargo (1996)", "Heat (1995)"], exclude_seen=False)

Rules:

- **user** — the prompt is the user's profile, their latest ``max_history`` items and the
  instruction of the user's sample of ``task`` on ``split`` (template, genre, season … as the
  evaluation samples have them), restricted to that sample's allowed subset (Category, Longtail,
  Discover). A task whose rule does not hold at the user's ``split`` target has no such sample:
  pass an ``instruction`` (then the task only names the request).
- **history** — titles or raw item ids, oldest first; the prompt is the history and the
  instruction (``instruction``, else the task's first template: only JustForYou and Longtail have
  templates without a slot to fill; Longtail keeps its long-tail subset).
- **allowed** — raw item ids; intersected with the task's subset.
- **exclude_seen** — the user's whole sequence (or the given history) is never recommended.

Item references are resolved by :class:`ItemLookup`: the exact raw id first, then the title,
case-insensitive, with runs of spaces collapsed, ``"Usual Suspects, The"`` = ``"The Usual
Suspects"`` = ``"Usual Suspects"`` (a leading article optional when nothing matches with it), and
a trailing ``(year)`` optional (``"Toy Story"`` finds ``"Toy Story (1995)"``; a
title that several items share needs its year or id). A reference that matches nothing raises
:class:`UnknownItem` with the closest titles (difflib).

Every error is a :class:`RequestError` (a ``ValueError``) whose ``status`` is the HTTP status
that fits: 404 unknown user or item, 413 request too large, 422 anything else.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import numpy as np

from .data.tasks import HISTORY_PLACEHOLDER, TASKS, TEMPLATES, TaskSample, _profile_text

__all__ = ["RequestError", "UnknownUser", "UnknownItem", "RequestTooLarge", "RequestLimits",
           "ItemLookup", "RequestBuilder"]

HISTORY_HEAD = "The user's history, oldest first: "
# Tasks whose first template has no slot to fill: usable with a history and no instruction.
_PLAIN_TASKS = tuple(t for t in TASKS if "{" not in TEMPLATES[t][0])


class RequestError(ValueError):
    """A request that cannot be answered as given; ``status`` is the HTTP status that fits."""

    status = 422


class UnknownUser(RequestError):
    status = 404


class UnknownItem(RequestError):
    status = 404


class RequestTooLarge(RequestError):
    status = 413


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on one request (larger ones raise :class:`RequestTooLarge`, except ``top_n``,
    which is a range)."""

    max_top_n: int = 100                # top_n in [1, max_top_n]
    max_history: int = 1000             # items in a history request (the prompt keeps the latest)
    max_allowed: int | None = None      # ids in ``allowed`` (None: the catalogue size)
    max_instruction_chars: int = 2000

    def __post_init__(self):
        for name in ("max_top_n", "max_history", "max_instruction_chars"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)!r}")
        if self.max_allowed is not None and self.max_allowed < 1:
            raise ValueError(f"max_allowed must be None or >= 1; got {self.max_allowed!r}")


_YEAR_TAIL = re.compile(r"\s*\((\d{4})\)\s*$")
_ARTICLE_TAIL = re.compile(r"^(.*), (the|a|an)$")


def _norm(text: str) -> str:
    """Lower case, runs of white space as one space, a trailing ", The" moved to the front."""
    t = " ".join(str(text).split()).casefold()
    m = _ARTICLE_TAIL.match(t)
    return f"{m.group(2)} {m.group(1)}" if m else t


_MAX_QUERY = 200      # characters of a missing title compared for suggestions
_POOL = 200           # titles difflib compares a missing title with
_STOP = {"the", "a", "an", "of", "and", "in", "on", "to", "la", "le", "les", "el", "de"}


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"\w+", text) if len(w) > 1 and w not in _STOP]


def _plain_title(title: str) -> str:
    """A title as words: a ``token_seq`` title field read as a list's text (``"['Toy',
    'Story']"``) is joined with spaces, so lookups work whichever way the reader rendered it."""
    if title.startswith("[") and title.endswith("]"):
        import ast

        try:
            parts = ast.literal_eval(title)
        except (ValueError, SyntaxError):
            return title
        if isinstance(parts, list) and all(isinstance(x, str) for x in parts):
            return " ".join(parts)
    return title


def _no_article(key: str) -> str:
    first, _, rest = key.partition(" ")
    return rest if first in ("the", "a", "an") and rest else key


def _split_year(text: str) -> tuple[str, int | None]:
    m = _YEAR_TAIL.search(text)
    if not m:
        return text, None
    return text[:m.start()], int(m.group(1))


class ItemLookup:
    """Raw item ids and titles → item indices (rules in the module docstring)."""

    def __init__(self, ds):
        self.ids = list(ds.item_ids)
        self.titles = list(ds.item_titles)
        self._by_id = {i: k for k, i in enumerate(self.ids)}
        self._keys: dict[str, set[int]] = {}
        self._bare_keys: dict[str, set[int]] = {}   # the same without a leading article
        years = np.asarray(ds.item_years).tolist()
        for k, (raw, title) in enumerate(zip(self.ids, self.titles)):
            title = _plain_title(title)
            bare, year = _split_year(title)
            if year is None and years[k] > 0:
                year = years[k]
            keys = {_norm(raw), _norm(title), _norm(bare)}
            if year is not None:
                keys.add(f"{_norm(bare)} ({year})")
            for key in keys:
                self._keys.setdefault(key, set()).add(k)
                self._bare_keys.setdefault(_no_article(key), set()).add(k)
        self._bare = sorted({_norm(_split_year(_plain_title(t))[0]) for t in self.titles})
        # word, and a word's first three letters -> positions in self._bare
        self._by_word: dict[str, list[int]] = {}
        for pos, title in enumerate(self._bare):
            for key in {k for w in _words(title) for k in (w, w[:3])}:
                self._by_word.setdefault(key, []).append(pos)

    def label(self, k: int) -> str:
        """How an item is named in messages: its title and raw id."""
        return f"{self.titles[k]!r} (id {self.ids[k]!r})"

    def resolve(self, ref) -> int:
        """The item index of a raw id or a title; :class:`UnknownItem` when nothing matches,
        :class:`RequestError` when a title matches several items."""
        if isinstance(ref, bool) or not isinstance(ref, (str, int)):
            raise RequestError(f"an item must be a title or an item id (a string); got "
                               f"{ref!r}")
        ref = str(ref)
        k = self._by_id.get(ref)
        if k is not None:
            return k
        key = _norm(ref)
        bare, year = _split_year(key)
        hits = self._keys.get(key) or (self._keys.get(f"{bare} ({year})") if year else None)
        if not hits:  # "Usual Suspects" for "Usual Suspects, The"
            hits = self._bare_keys.get(_no_article(key)) or (
                self._bare_keys.get(_no_article(f"{bare} ({year})")) if year else None)
        if not hits:
            close = self.close_matches(ref)
            raise UnknownItem(f"unknown title or item id {ref!r}: nothing in the catalogue; close "
                              f"matches: {', '.join(close) if close else 'none'}")
        if len(hits) > 1:
            raise RequestError(f"item {ref!r} is ambiguous: it names "
                               f"{', '.join(self.label(h) for h in sorted(hits))}; give the "
                               f"year or the item id")
        return next(iter(hits))

    def close_matches(self, ref: str, n: int = 5) -> list[str]:
        """Titles (with their ids) closest to ``ref``: titles containing it or contained in it
        first, then difflib over the titles sharing words (or words' first three letters)
        with it, the most shared first — a bounded pool, so a miss costs about a millisecond
        whatever the catalogue's size."""
        bare = _norm(_split_year(str(ref))[0])[:_MAX_QUERY]
        names = [t for t in self._bare if bare and (bare in t or (len(t) > 3 and t in bare))]
        names.sort(key=lambda t: (-(t in bare) * len(t), t))   # the longest contained first
        names = names[:n]
        score: dict[int, int] = {}
        for w in set(_words(bare)):
            for key, weight in ((w, 2), (w[:3], 1)):
                for t in self._by_word.get(key, ()):
                    score[t] = score.get(t, 0) + weight
        pool = [self._bare[t] for t in sorted(score, key=lambda t: (-score[t], t))[:_POOL]]
        names += [t for t in difflib.get_close_matches(bare, pool, n=n, cutoff=0.5)
                  if t not in names]
        out = []
        for name in names[:n]:
            out += [self.label(k) for k in sorted(self._keys.get(name, ()))]
        return out[:n]

    def resolve_ids(self, ids, what: str = "allowed") -> np.ndarray:
        """Sorted unique item indices of a list of raw ids (ids only, not titles)."""
        get = self._by_id.get
        # a str, or an int standing for its decimal id (bool is not an id)
        idx = [get(raw) if type(raw) is str else get(str(raw)) if type(raw) is int else None
               for raw in ids]
        if None in idx:
            bad = [raw for raw, k in zip(ids, idx) if k is None]
            raise RequestError(f"{what}: {len(bad)} of {len(ids)} ids are not in the catalogue "
                               f"(raw item ids, e.g. {self.ids[:2]}): {bad[:5]}"
                               + (" ..." if len(bad) > 5 else ""))
        mask = np.zeros(len(self.ids), dtype=bool)
        mask[idx] = True
        return np.flatnonzero(mask).astype(np.int32)


class RequestBuilder:
    """Builds the model input of a request against one dataset (see the module docstring).

    Args:
        ds: the run's ``RecDataset``.
        split: the split whose task samples give a user's instruction and allowed subset.
        seed: the tasks' template seed (the run's ``data.seed``).
        limits: :class:`RequestLimits`.
    """

    def __init__(self, ds, *, split: str = "test", seed: int = 0,
                 limits: RequestLimits | None = None):
        from .data.tasks import _Context, build_task_samples

        self.ds = ds
        self.split = split
        self.limits = limits or RequestLimits()
        self.items = ItemLookup(ds)
        self._users = {u: k for k, u in enumerate(ds.user_ids)}
        self._samples: dict[tuple[int, str], TaskSample] = {}
        for s in build_task_samples(ds, split, seed=seed):
            self._samples[(s.user, s.task)] = s
        self._tail = _Context(ds, 0.2, 5).tail  # iter_task_samples' default head fraction

    # --------------------------------------------------------------------------- queries
    def user_index(self, user) -> int:
        if isinstance(user, bool) or not isinstance(user, (str, int)):
            raise RequestError(f"user must be a user id (a string); got {user!r}")
        u = self._users.get(str(user))
        if u is None:
            close = difflib.get_close_matches(str(user), self.ds.user_ids, n=3, cutoff=0.6)
            raise UnknownUser(f"unknown user {str(user)!r}: not in {self.ds.name} (ids like "
                              f"{self.ds.user_ids[:3]}"
                              + (f"; close matches: {close}" if close else "") + ")")
        return u

    def user_tasks(self, user) -> list[str]:
        """The tasks that apply to ``user`` without an instruction, in :data:`TASKS` order."""
        u = self.user_index(user)
        return [t for t in TASKS if (u, t) in self._samples]

    def task_users(self) -> dict[str, list[str]]:
        """For each task, the users it applies to without an instruction."""
        out: dict[str, list[str]] = {t: [] for t in TASKS}
        for (u, t) in sorted(self._samples, key=lambda k: (TASKS.index(k[1]), k[0])):
            out[t].append(self.ds.user_ids[u])
        return out

    def check_top_n(self, top_n) -> int:
        hi = self.limits.max_top_n
        if isinstance(top_n, bool) or not isinstance(top_n, int) or not 1 <= top_n <= hi:
            raise RequestError(f"top_n must be an integer in [1, {hi}]; got {top_n!r}")
        return top_n

    # ----------------------------------------------------------------------------- build
    def build(self, *, user=None, history=None, task: str | None = None,
              instruction: str | None = None, allowed=None, exclude_seen: bool = True
              ) -> TaskSample:
        """The :class:`TaskSample` of one request (``task`` defaults to JustForYou)."""
        task = "JustForYou" if task is None else task
        if task not in TASKS:
            close = difflib.get_close_matches(str(task), TASKS, n=1, cutoff=0.5)
            raise RequestError(f"unknown task {task!r}: expected one of {list(TASKS)}"
                               + (f" (did you mean {close[0]!r}?)" if close else ""))
        if (user is None) == (history is None):
            raise RequestError("give exactly one of user (a user id) or history (a list of "
                               "titles or item ids); got "
                               + ("both" if user is not None else "neither"))
        if instruction is not None:
            if not isinstance(instruction, str) or not instruction.strip():
                raise RequestError(f"instruction must be non-empty text; got {instruction!r}")
            if len(instruction) > self.limits.max_instruction_chars:
                raise RequestTooLarge(f"instruction has {len(instruction)} characters; at most "
                                      f"{self.limits.max_instruction_chars} are accepted")
            instruction = instruction.strip()
        if allowed is not None:
            if isinstance(allowed, (str, bytes)) or not hasattr(allowed, "__len__"):
                raise RequestError(f"allowed must be a list of item ids; got {allowed!r}")
            cap = self.limits.max_allowed or self.ds.num_items
            if len(allowed) > cap:
                raise RequestTooLarge(f"allowed has {len(allowed)} ids; at most {cap} are "
                                      f"accepted")
            if len(allowed) == 0:
                raise RequestError("allowed is empty: give at least one item id")
            allowed = self.items.resolve_ids(allowed)
        if user is not None:
            sample = self._for_user(user, task, instruction)
        else:
            sample = self._for_history(history, task, instruction)
        subset = sample.allowed
        if allowed is not None or exclude_seen:
            # set arithmetic on a mask over the catalogue: linear, no sorting
            n = self.ds.num_items
            mask = np.ones(n, dtype=bool) if subset is None else _mask(subset, n)
            if allowed is not None:
                mask &= _mask(allowed, n)
            if exclude_seen:
                mask[np.asarray(sample.seen, dtype=np.intp)] = False
            subset = np.flatnonzero(mask)
        if subset is not None:
            subset = np.ascontiguousarray(subset, dtype=np.int32)
            if subset.size == 0:
                raise RequestError(
                    f"no item is left to recommend: the {task} subset"
                    + (", the allowed ids" if allowed is not None else "")
                    + (" and the exclusion of seen items" if exclude_seen else "")
                    + " leave nothing" + (" (set exclude_seen to false?)" if exclude_seen
                                          else ""))
        return TaskSample(task, self.split, sample.user, -1, sample.prompt, sample.history,
                          -1, subset, sample.template, sample.params)

    def _for_user(self, user, task, instruction):
        u = self.user_index(user)
        base = self._samples.get((u, task))
        if base is None and instruction is None:
            raise RequestError(f"task {task} does not apply to user {self.ds.user_ids[u]!r} "
                               f"(its rule does not hold at the user's {self.split} target); "
                               f"pass an instruction, or one of the user's tasks "
                               f"{self.user_tasks(user)}")
        head = f"{_profile_text(self.ds.user_profiles[u])}{HISTORY_HEAD}"
        if base is not None:
            head = base.prompt.split(HISTORY_PLACEHOLDER)[0]
        seq = self.ds.sequence(u)
        prompt = (f"{head}{HISTORY_PLACEHOLDER}. {instruction}" if instruction is not None
                  else base.prompt)
        return _Draft(u, prompt, seq[-self.ds.max_history:], seq,
                      base.allowed if base is not None else None,
                      base.template if base is not None else 0,
                      base.params if base is not None else None)

    def _for_history(self, history, task, instruction):
        if isinstance(history, (str, bytes)) or not hasattr(history, "__len__"):
            raise RequestError(f"history must be a list of titles or item ids; got {history!r}")
        if len(history) == 0:
            raise RequestError("history is empty: give at least one title or item id")
        if len(history) > self.limits.max_history:
            raise RequestTooLarge(f"history has {len(history)} items; at most "
                                  f"{self.limits.max_history} are accepted")
        if instruction is None and task not in _PLAIN_TASKS:
            raise RequestError(f"task {task} needs an instruction with a history (its "
                               f"templates name a {', '.join(_slots(task))} taken from a "
                               f"dataset user's sample); pass an instruction, or a task of "
                               f"{list(_PLAIN_TASKS)}")
        items = np.asarray([self.items.resolve(h) for h in history], dtype=np.int32)
        text = instruction if instruction is not None else TEMPLATES[task][0]
        allowed = self._tail if task == "Longtail" else None
        return _Draft(-1, f"{HISTORY_HEAD}{HISTORY_PLACEHOLDER}. {text}", items, items,
                      allowed, 0, None)


def _mask(indices, n: int) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    m[np.asarray(indices, dtype=np.intp)] = True
    return m


def _slots(task: str) -> list[str]:
    return sorted(set(re.findall(r"\{(\w+)\}", TEMPLATES[task][0])))


@dataclass
class _Draft:
    user: int
    prompt: str
    history: np.ndarray
    seen: np.ndarray
    allowed: np.ndarray | None
    template: int
    params: dict | None
