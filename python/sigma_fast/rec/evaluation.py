"""Offline evaluation: HR@k / NDCG@k per task with user-bootstrap confidence intervals, and the
results table / charts the paper reports (HR@1/5/10/20 in %).

A *ranking* is a row of item indices, best first, padded with -1 (a method may return fewer items
than asked, e.g. when a sample's allowed subset is small). For one sample whose target sits at
0-based position ``r`` of its ranking (``r = inf`` when it is absent):

    HR@k   = 1 if r < k else 0
    NDCG@k = 1 / log2(r + 2) if r < k else 0      (one relevant item, so IDCG = 1)

Confidence intervals come from the bootstrap over *users*: a replicate draws the task's users with
replacement and a drawn user brings all of their samples of that task, so users with many samples
(the "all" row, or tasks with several samples per user) are not treated as independent draws.
The replicate statistic is the sample mean over the drawn samples; the interval is the 2.5th and
97.5th percentile of the replicates.
"""

from __future__ import annotations

import io
import os
import re
import warnings
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .._io import atomic_write_bytes, atomic_write_json

__all__ = ["ALL", "bootstrap_ci", "evaluate_rankings", "hit_ndcg", "paired_difference",
           "ranking_violations",
           "results_table", "write_results"]

ALL = "all"
DEFAULT_TABLE_METRICS = ("HR@1", "HR@5", "HR@10", "HR@20", "NDCG@10")
CHART_METRICS = ("HR@1", "HR@5", "HR@10", "HR@20")


# ----------------------------------------------------------------------------- metrics

def _as_rankings(rankings) -> np.ndarray:
    r = np.asarray(rankings.cpu() if hasattr(rankings, "cpu") else rankings)
    if r.ndim != 2:
        raise ValueError(f"rankings must be a 2-D array [samples, ranked items]; got shape "
                         f"{r.shape}")
    if r.size and not np.issubdtype(r.dtype, np.integer):
        raise ValueError(f"rankings must hold integer item indices; got dtype {r.dtype}")
    return r.astype(np.int64, copy=False)


def _check_ks(ks, depth: int, what: str) -> tuple[int, ...]:
    ks = (ks,) if isinstance(ks, (int, np.integer)) else tuple(ks)
    for k in ks:
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"{what} must be positive ints; got {k!r}")
        if k > depth:
            raise ValueError(f"{what} asks for @{k} but the rankings hold only {depth} items per "
                             f"sample; rank at least {k} items")
    return tuple(int(k) for k in ks)


def _target_ranks(rankings: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """float64 [S]: 0-based position of each target in its ranking (first hit), inf if absent."""
    hit = rankings == targets[:, None]
    found = hit.any(1)
    return np.where(found, hit.argmax(1), np.inf).astype(np.float64)


def hit_ndcg(rankings, targets, ks=(1, 5, 10, 20), *, ndcg_ks=None) -> dict[str, np.ndarray]:
    """Per-sample hit rate and NDCG.

    ``rankings``: int [S, R], item indices best first, -1 padding. ``targets``: int [S], >= 0.
    ``ks``: cut-offs (each <= R) for HR@k and, unless ``ndcg_ks`` is given, NDCG@k.
    Returns ``{"HR@k": float64 [S] of 0/1, ..., "NDCG@k": float64 [S], ...}`` with
    NDCG@k = 1/log2(rank + 2) when the target's 0-based rank is < k, else 0.
    """
    r = _as_rankings(rankings)
    t = np.asarray(targets.cpu() if hasattr(targets, "cpu") else targets)
    if t.ndim != 1 or t.shape[0] != r.shape[0]:
        raise ValueError(f"targets must be 1-D with one entry per ranking row ({r.shape[0]}); "
                         f"got shape {t.shape}")
    if t.size and not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"targets must hold integer item indices; got dtype {t.dtype}")
    t = t.astype(np.int64, copy=False)
    if t.size and t.min() < 0:
        bad = int(np.flatnonzero(t < 0)[0])
        raise ValueError(f"targets must be item indices >= 0; sample {bad} has {int(t[bad])}")
    hr_ks = _check_ks(ks, r.shape[1], "ks")
    nd_ks = hr_ks if ndcg_ks is None else _check_ks(ndcg_ks, r.shape[1], "ndcg_ks")
    rank = _target_ranks(r, t)
    gain = 1.0 / np.log2(np.where(np.isfinite(rank), rank, 0.0) + 2.0)
    out: dict[str, np.ndarray] = {}
    for k in hr_ks:
        out[f"HR@{k}"] = (rank < k).astype(np.float64)
    for k in nd_ks:
        out[f"NDCG@{k}"] = np.where(rank < k, gain, 0.0)
    return out


# --------------------------------------------------------------------------- bootstrap

def bootstrap_ci(values, groups=None, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                 rng: np.random.Generator | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and percentile bootstrap interval of per-sample values, resampling *groups*.

    ``values``: float [n] or [n, m] (m statistics sharing the same resamples). ``groups``: int
    [n] group (user) of each sample, None for one group per sample. Each replicate draws the
    distinct groups with replacement (a multinomial count per group) and takes the mean over all
    samples of the drawn groups. Returns ``(mean, lo, hi)``, each float64 [m] ([1] when
    ``values`` is 1-D). Deterministic for ``seed`` (or the given ``rng``).
    """
    v = np.asarray(values, dtype=np.float64)
    v2 = v[:, None] if v.ndim == 1 else v
    if v2.ndim != 2 or v2.shape[0] == 0:
        raise ValueError(f"values must be a non-empty [n] or [n, m] array; got shape {v.shape}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1); got {level!r}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot!r}")
    n = v2.shape[0]
    if groups is None:
        inverse = np.arange(n)
    else:
        g = np.asarray(groups)
        if g.shape != (n,):
            raise ValueError(f"groups must be 1-D with one entry per value ({n}); got shape "
                             f"{g.shape}")
        _, inverse = np.unique(g, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    sums = np.zeros((n_groups, v2.shape[1]))
    np.add.at(sums, inverse, v2)
    counts = np.bincount(inverse, minlength=n_groups).astype(np.float64)
    mean = sums.sum(0) / counts.sum()
    rng = np.random.default_rng(seed) if rng is None else rng
    # Replicates in blocks so that the [block, groups] count matrix stays around 32 MB.
    block = max(1, min(n_boot, (1 << 22) // n_groups))
    p = np.full(n_groups, 1.0 / n_groups)
    reps = []
    for start in range(0, n_boot, block):
        w = rng.multinomial(n_groups, p, size=min(block, n_boot - start)).astype(np.float64)
        reps.append((w @ sums) / (w @ counts)[:, None])
    reps = np.concatenate(reps)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(reps, [alpha, 1.0 - alpha], axis=0)
    # Percentiles of a ratio can sit a rounding error outside [min, max] of the data's mean.
    return mean, np.minimum(lo, mean), np.maximum(hi, mean)


# --------------------------------------------------------------------------- evaluation

def paired_difference(samples: Sequence, rankings_a, rankings_b, *, k: int = 10,
                      n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Paired comparison of two rankings of the same samples: per task and over all samples,
    the mean of HR@k(a) − HR@k(b) and NDCG@k(a) − NDCG@k(b) with a ``level`` bootstrap interval
    over users (both methods resampled together, so the interval is that of the difference,
    far narrower than two separate intervals). Returns ``{task: {"HR@k": {"mean", "lo", "hi"},
    "NDCG@k": {...}, "n": samples}}`` in task order, then ``"all"``."""
    samples = list(samples)
    ra, rb = _as_rankings(rankings_a), _as_rankings(rankings_b)
    if ra.shape[0] != len(samples) or rb.shape[0] != len(samples):
        raise ValueError(f"both rankings need one row per sample ({len(samples)}); got "
                         f"{ra.shape[0]} and {rb.shape[0]} rows")
    if not samples:
        raise ValueError("no samples to compare")
    targets = np.fromiter((s.target for s in samples), dtype=np.int64, count=len(samples))
    a = hit_ndcg(ra, targets, (k,), ndcg_ks=(k,))
    b = hit_ndcg(rb, targets, (k,), ndcg_ks=(k,))
    names = [f"HR@{k}", f"NDCG@{k}"]
    diff = np.stack([a[m] - b[m] for m in names], axis=1)
    users = np.fromiter((s.user for s in samples), dtype=np.int64, count=len(samples))
    tasks = np.array([s.task for s in samples], dtype=object)
    out: dict = {}
    for name in _task_order(tasks.tolist()) + [ALL]:
        rows = np.arange(len(samples)) if name == ALL else np.flatnonzero(tasks == name)
        mean, lo, hi = bootstrap_ci(diff[rows], users[rows], n_boot=n_boot, level=level,
                                    rng=_seed_for(seed, name))
        out[name] = {m: {"mean": float(mean[j]), "lo": float(lo[j]), "hi": float(hi[j])}
                     for j, m in enumerate(names)}
        out[name]["n"] = int(len(rows))
    return out


def _check_rankings_allowed(samples: Sequence, r: np.ndarray) -> None:
    """Every ranked item is unique within its row and inside the sample's allowed subset."""
    if r.size == 0:
        return
    bad = np.flatnonzero((r < -1).any(1))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"sample {i}: ranking holds negative item {int(r[i][r[i] < -1][0])}; "
                         f"only -1 may pad a ranking")
    s = np.sort(r, axis=1)
    dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
    bad = np.flatnonzero(dup.any(1))
    if bad.size:
        i = int(bad[0])
        item = int(s[i, 1:][dup[i]][0])
        raise ValueError(f"sample {i}: ranking lists item {item} more than once; generated items "
                         f"must be unique")
    # Samples of one task share their allowed arrays: check each distinct array once.
    by_subset: dict[int, tuple[np.ndarray, list[int]]] = {}
    for i, smp in enumerate(samples):
        if smp.allowed is not None:
            by_subset.setdefault(id(smp.allowed), (smp.allowed, []))[1].append(i)
    for allowed, rows in by_subset.values():
        a = np.sort(np.asarray(allowed, dtype=np.int64))  # sorted by contract; cheap to ensure
        rr = r[rows]
        pos = np.searchsorted(a, rr).clip(0, max(len(a) - 1, 0))
        inside = (a[pos] == rr) if len(a) else np.zeros(rr.shape, bool)
        bad = (rr >= 0) & ~inside
        if bad.any():
            j, c = np.argwhere(bad)[0]
            raise ValueError(f"sample {rows[j]} ({samples[rows[j]].task}): ranked item "
                             f"{int(rr[j, c])} at position {int(c)} is outside the sample's "
                             f"allowed subset ({len(a)} items); generation must only return "
                             f"allowed items")


def ranking_violations(samples: Sequence, rankings) -> dict[str, int]:
    """``{"illegal": ranked items outside their sample's allowed subset (or below -1),
    "duplicates": repeated items within a row}``, counted over all rows (-1 padding aside). A
    correct recommender scores 0 on both."""
    r = _as_rankings(rankings)
    if r.size == 0:
        return {"illegal": 0, "duplicates": 0}
    srt = np.sort(r, axis=1)
    dup = int(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).sum())
    illegal = int((r < -1).sum())
    by_subset: dict[int, tuple[np.ndarray, list[int]]] = {}
    for i, smp in enumerate(samples):
        if smp.allowed is not None:
            by_subset.setdefault(id(smp.allowed), (smp.allowed, []))[1].append(i)
    for allowed, rows in by_subset.values():
        a = np.sort(np.asarray(allowed, dtype=np.int64))
        rr = r[rows]
        pos = np.searchsorted(a, rr).clip(0, max(len(a) - 1, 0))
        inside = (a[pos] == rr) if len(a) else np.zeros(rr.shape, bool)
        illegal += int(((rr >= 0) & ~inside).sum())
    return {"illegal": illegal, "duplicates": dup}


def _task_order(tasks) -> list[str]:
    from .data.tasks import TASKS

    present = set(tasks)
    return [t for t in TASKS if t in present] + sorted(present - set(TASKS))


def _seed_for(seed: int, name: str) -> np.random.Generator:
    # One stream per task so that adding or dropping a task leaves the others' intervals alone.
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])


def evaluate_rankings(samples: Sequence, rankings, *, hr_ks=(1, 5, 10, 20), ndcg_ks=(5, 10, 20),
                      bootstrap: int = 1000, seed: int = 0, check_allowed: bool = True,
                      level: float = 0.95) -> dict:
    """HR@k and NDCG@k of ``rankings`` (int [S, R], best first, -1 padding; row i ranks
    ``samples[i]``, a :class:`~sigma_fast.data.TaskSample`) per task and over all samples.

    Returns ``{task: {"HR@1": {"mean", "lo", "hi"}, ..., "NDCG@5": {...}, ..., "n": samples,
    "users": distinct users}}`` in task order, then ``"all"`` (every sample). ``lo`` / ``hi`` is
    the ``level`` bootstrap interval over users (``bootstrap`` replicates; 0 gives None), seeded
    per task from ``seed``. ``"all"`` also counts the ``"illegal"`` (outside the sample's
    allowed subset) and ``"duplicates"`` (repeated in a row) ranked items; with
    ``check_allowed`` any of them is a ValueError naming the sample.
    """
    samples = list(samples)
    r = _as_rankings(rankings)
    if r.shape[0] != len(samples):
        raise ValueError(f"rankings must have one row per sample ({len(samples)}); got "
                         f"{r.shape[0]} rows")
    if not samples:
        raise ValueError("no samples to evaluate")
    if not isinstance(bootstrap, (int, np.integer)) or bootstrap < 0:
        raise ValueError(f"bootstrap must be an int >= 0; got {bootstrap!r}")
    violations = ranking_violations(samples, r)
    if check_allowed and (violations["illegal"] or violations["duplicates"]):
        _check_rankings_allowed(samples, r)  # raises, naming the first offending sample
    targets = np.fromiter((s.target for s in samples), dtype=np.int64, count=len(samples))
    per = hit_ndcg(r, targets, hr_ks, ndcg_ks=ndcg_ks)
    names = list(per)
    values = np.stack([per[m] for m in names], axis=1)
    users = np.fromiter((s.user for s in samples), dtype=np.int64, count=len(samples))
    tasks = np.array([s.task for s in samples], dtype=object)
    out: dict = {}
    for name in _task_order(tasks.tolist()) + [ALL]:
        rows = np.arange(len(samples)) if name == ALL else np.flatnonzero(tasks == name)
        v, u = values[rows], users[rows]
        if bootstrap:
            mean, lo, hi = bootstrap_ci(v, u, n_boot=bootstrap, level=level,
                                        rng=_seed_for(seed, name))
        else:
            mean, lo, hi = v.mean(0), [None] * len(names), [None] * len(names)
        entry: dict = {}
        for j, m in enumerate(names):
            entry[m] = {"mean": float(mean[j]),
                        "lo": None if lo[j] is None else float(lo[j]),
                        "hi": None if hi[j] is None else float(hi[j])}
        entry["n"] = int(len(rows))
        entry["users"] = int(len(np.unique(u)))
        out[name] = entry
    out[ALL].update(violations)
    return out


# ------------------------------------------------------------------------------ reports

def _is_task_results(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(v, Mapping) and "n" in v for v in obj.values())


def _as_methods(results) -> dict[str, dict]:
    """``{method: {task: {...}}}``; a single method's per-task results get the name "method"."""
    if _is_task_results(results):
        return {"method": dict(results)}
    if not isinstance(results, Mapping) or not results or not all(
            _is_task_results(v) for v in results.values()):
        raise ValueError("results must map method names to evaluate_rankings() outputs "
                         "({method: {task: {metric: {'mean', 'lo', 'hi'}, 'n', 'users'}}})")
    return {str(k): v for k, v in results.items()}


def _tasks_of(methods: dict[str, dict]) -> list[str]:
    names = {t for res in methods.values() for t in res}
    return _task_order(names - {ALL}) + ([ALL] if ALL in names else [])


def _cell(stat) -> str:
    if stat is None:
        return "–"
    mean = 100.0 * stat["mean"]
    if stat.get("lo") is None or stat.get("hi") is None:
        return f"{mean:.2f}"
    half = 50.0 * (stat["hi"] - stat["lo"])
    return f"{mean:.2f} ± {half:.2f}"


def results_table(results, metrics: Sequence[str] = DEFAULT_TABLE_METRICS) -> str:
    """A Markdown table with one row per (task, method): ``n``, users, and each metric as
    "mean ± half-width of the CI" in percent (the paper's HR@k in %). The best mean of each task
    and metric is in bold when several methods are compared. ``results``: ``{method:
    evaluate_rankings(...)}`` (a single evaluate_rankings output is accepted as one method)."""
    methods = _as_methods(results)
    metrics = list(metrics)
    header = ["Task", "Method", "n", "users"] + [f"{m} (%)" for m in metrics]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|"]
    for task in _tasks_of(methods):
        present = {name: res[task] for name, res in methods.items() if task in res}
        best = {}
        for m in metrics:
            means = [e[m]["mean"] for e in present.values() if m in e]
            best[m] = max(means) if len(present) > 1 and means else None
        for name, e in present.items():
            cells = []
            for m in metrics:
                c = _cell(e.get(m))
                if best[m] is not None and m in e and e[m]["mean"] == best[m]:
                    c = f"**{c}**"
                cells.append(c)
            lines.append("| " + " | ".join([task, name, str(e.get("n", "")),
                                            str(e.get("users", ""))] + cells) + " |")
    return "\n".join(lines) + "\n"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "task"


def _chart(task: str, methods: dict[str, dict], title: str | None) -> bytes | None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    present = {n: res[task] for n, res in methods.items() if task in res}
    metrics = [m for m in CHART_METRICS if any(m in e for e in present.values())]
    if not present or not metrics:
        return None
    fig = Figure(figsize=(1.6 + 1.3 * len(metrics) * max(1, len(present)) / 2, 3.6), dpi=120)
    FigureCanvasAgg(fig)  # the Agg canvas, without touching pyplot's global backend
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(present)
    x = np.arange(len(metrics))
    for j, (name, e) in enumerate(present.items()):
        mean = np.array([100.0 * e[m]["mean"] if m in e else np.nan for m in metrics])
        err = None
        if all(m in e and e[m].get("lo") is not None for m in metrics):
            lo = np.array([100.0 * e[m]["lo"] for m in metrics])
            hi = np.array([100.0 * e[m]["hi"] for m in metrics])
            err = np.vstack([mean - lo, hi - mean]).clip(0)
        ax.bar(x + (j - (len(present) - 1) / 2) * width, mean, width, yerr=err, capsize=3,
               label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(metrics)
    ax.set_ylabel("%")
    n = max(e.get("n", 0) for e in present.values())
    head = f"{title}: " if title else ""
    ax.set_title(f"{head}{task} (n={n}, 95% CI over users)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_results(results, out_dir: str | os.PathLike, *, title: str | None = None,
                  metrics: Sequence[str] = DEFAULT_TABLE_METRICS) -> list[Path]:
    """Write ``results.json`` (the results as given), ``results.md`` (title and
    :func:`results_table`) and, when matplotlib is installed, ``hr_<task>.png`` per task (grouped
    bars of HR@1/5/10/20 per method with the CI as error bars) into ``out_dir``; every file is
    replaced atomically. Returns the written paths."""
    methods = _as_methods(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    atomic_write_json(out / "results.json", methods)
    written.append(out / "results.json")
    md = (f"# {title}\n\n" if title else "") + results_table(methods, metrics)
    atomic_write_bytes(out / "results.md", md.encode())
    written.append(out / "results.md")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn("matplotlib is not installed: wrote results.json and results.md but no "
                      "charts; install it with: pip install matplotlib", stacklevel=2)
        return written
    for task in _tasks_of(methods):
        png = _chart(task, methods, title)
        if png is not None:
            path = out / f"hr_{_safe_name(task)}.png"
            atomic_write_bytes(path, png)
            written.append(path)
    return written
