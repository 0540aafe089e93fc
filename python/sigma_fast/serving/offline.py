"""Batch-offline recommendations: the top N items of every user × task, as Parquet shards
(the paper's nearline deployment precomputes them).

>>> manifest = recommend_all("runs/demo", "runs/demo/recs", top_n=20)
>>> import pyarrow.parquet as pq; pq.read_table("runs/demo/recs").to_pandas()

Each (user, task) request is the one ``sigma-fast recommend --user U --task T`` makes
(:mod:`sigma_fast.rec.requests`): the user's latest items, the instruction and allowed subset of
the user's sample of the task on ``split``, seen items excluded. Tasks whose rule does not hold
at a user's ``split`` target are left out (the manifest counts them).

Users are cut, in dataset order, into shards of ``shard_users``; shard ``s`` is
``part-<s>-of-<n>.parquet`` with columns ``user_id, task, rank, item_id, title, score`` (rank 1 =
best; raw ids as in the atomic files), rows ordered by user, task (``TASKS`` order), rank. Every
batch holds whole users (all of a user's tasks together, so an engine can reuse the user's
history across them), and batches are formed inside a shard, so the results do not depend on
how many processes ran (bit for bit when every process computes with the same pinned thread
count: ``OMP_NUM_THREADS=1 SIGMA_FAST_NUM_THREADS=1``).

Under ``torchrun --nproc-per-node P`` rank r computes shards r, r + P, …; the process group is
gloo on CPU and NCCL on GPU (``device="cuda"`` puts rank r on ``cuda:LOCAL_RANK``). Shards are
written atomically (temporary file + rename) with the run's settings in their metadata; a rerun
with the same settings skips finished shards, and other settings in the same folder are an
error. Rank 0 writes ``_manifest.json`` (settings, shards, row counts) once every rank is done.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from .._io import atomic_write_bytes, atomic_write_json

__all__ = ["recommend_all", "read_shard_settings", "COLUMNS"]

COLUMNS = ("user_id", "task", "rank", "item_id", "title", "score")
FORMAT = "sigma_fast.recommend_all"
FORMAT_VERSION = 1
_META_KEY = b"sigma_fast"


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"recommend-all writes Parquet with pyarrow ({exc}); install "
                                  f"it with: pip install 'sigma_fast[serve]'") from None
    return pa, pq


def _model_fingerprint(run_dir: Path, variant: str) -> list:
    """(file, size, mtime) of every file of the variant's saved model: a retrained model is a
    new directory (written atomically), so its shards are not mistaken for finished."""
    name = "sigma" if variant == "no_apf" else variant
    folder = run_dir / "models" / name
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            out.append([str(p.relative_to(folder)), st.st_size, st.st_mtime_ns])
    return out


def read_shard_settings(path) -> dict | None:
    """The settings a shard was written with (None for a Parquet file without them)."""
    _, pq = _pyarrow()
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(_META_KEY)
    return None if raw is None else json.loads(raw)


class _Group:
    """torchrun's process group: (world, rank, local rank), created here when needed."""

    def __init__(self, device: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.created = False
        if self.world > 1:
            import torch
            import torch.distributed as dist

            cuda = device is not None and str(device).startswith("cuda")
            if cuda:
                torch.cuda.set_device(self.local_rank)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if cuda else "gloo")
                self.created = True
            self.world, self.rank = dist.get_world_size(), dist.get_rank()

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self):
        if self.created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _say(group: _Group, msg: str) -> None:
    if group.rank == 0:
        print(msg, flush=True)


def recommend_all(run_dir, out_dir, *, variant: str = "sigma", tasks=None, top_n: int = 20,
                  split: str = "test", shard_users: int = 256, batch_size: int = 32,
                  device=None, exclude_seen: bool = True, engine: bool = True,
                  backend=None, progress: bool | None = None) -> dict:
    """Write the top ``top_n`` of every user × task of a trained run to ``out_dir`` (see the
    module docstring); returns the manifest.

    ``batch_size``: requests per backend call (whole users; a user's tasks never split);
    ``backend``: a ready backend (default: :func:`~sigma_fast.serving.load_backend` of
    ``variant`` on ``device``: the eager ``Recommender``, or with ``engine`` the ``Engine``)."""
    from ..rec.data.tasks import TASKS
    from ..rec.pipeline import VARIANTS, request_builder
    from ..rec.requests import RequestError
    from .backend import load_backend, run_settings

    pa, pq = _pyarrow()
    tasks = list(TASKS if tasks is None else ([tasks] if isinstance(tasks, str) else tasks))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks must be names from {TASKS}; got {tasks}")
    tasks = [t for t in TASKS if t in tasks]
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected names from {VARIANTS}")
    for key, value in (("top_n", top_n), ("shard_users", shard_users),
                       ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an int >= 1; got {value!r}")
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test'; got {split!r}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = run_settings(run_dir)
    group = _Group(device)
    try:
        dev = device
        if group.world > 1 and device is not None and str(device).startswith("cuda"):
            dev = f"cuda:{group.local_rank}"
        rb = request_builder(cfg, split=split)
        ds = rb.ds
        users = list(ds.user_ids)
        n_shards = max(1, math.ceil(len(users) / shard_users))
        settings = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "dataset": ds.name, "dataset_fingerprint": ds.fingerprint,
                    "variant": variant, "model": _model_fingerprint(run_dir, variant),
                    "tasks": tasks, "top_n": top_n, "split": split,
                    "exclude_seen": bool(exclude_seen), "shard_users": shard_users,
                    "num_beams": cfg["eval"]["num_beams"], "top_m": cfg["eval"]["top_m"],
                    "seed": cfg["data"]["seed"]}
        _check_folder(out_dir, settings)
        mine = [s for s in range(n_shards) if s % group.world == group.rank]
        todo = [s for s in mine if not _finished(_shard_path(out_dir, s, n_shards), settings)]
        _say(group, f"[recommend-all] {len(users)} users x {len(tasks)} tasks, top {top_n}, "
                    f"{n_shards} shards of {shard_users} users over {group.world} process(es); "
                    f"{len(mine) - len(todo)} of this rank's {len(mine)} shards already done")
        if todo and backend is None:
            backend = load_backend(run_dir, variant, dev, cfg=cfg, batch_size=batch_size,
                                   engine=engine, max_top_n=top_n)
        from tqdm.auto import tqdm

        show = group.rank == 0 and (progress if progress is not None else None)
        bar = tqdm(total=sum(len(users[s * shard_users:(s + 1) * shard_users]) for s in todo),
                   desc="recommend-all", unit="user",
                   disable=(not show) if show is not None else group.rank != 0)
        t0 = time.perf_counter()
        records = []
        for s in mine:
            path = _shard_path(out_dir, s, n_shards)
            part = users[s * shard_users:(s + 1) * shard_users]
            if s in todo:
                table, stats = _compute_shard(rb, backend, part, tasks, top_n, batch_size,
                                              exclude_seen, RequestError, pa, bar)
                meta = {**settings, "shard": s, "num_shards": n_shards,
                        "batch_size": batch_size, "backend": type(backend).__name__, **stats}
                table = table.replace_schema_metadata({_META_KEY: json.dumps(meta)})
                buf = io.BytesIO()
                pq.write_table(table, buf)
                atomic_write_bytes(path, buf.getvalue())
            else:
                meta = read_shard_settings(path)
            records.append({"file": path.name, "shard": s, "first_user": part[0],
                            "last_user": part[-1], "users": len(part),
                            "rows": meta["rows"], "requests": meta["requests"],
                            "not_applicable": meta["not_applicable"],
                            "nothing_left": meta["nothing_left"],
                            "skipped": s not in todo})
        bar.close()
        elapsed = time.perf_counter() - t0
        gathered = [r for rs in group.gather(records) for r in rs]
        gathered.sort(key=lambda r: r["shard"])
        manifest = {**{k: v for k, v in settings.items() if k != "model"},
                    "num_shards": n_shards, "world_size": group.world, "columns": list(COLUMNS),
                    "users": len(users), "rows": sum(r["rows"] for r in gathered),
                    "requests": sum(r["requests"] for r in gathered),
                    "not_applicable": sum(r["not_applicable"] for r in gathered),
                    "nothing_left": sum(r["nothing_left"] for r in gathered),
                    "shards": gathered}
        if group.rank == 0:
            atomic_write_json(out_dir / "_manifest.json", manifest)
        done = sum(not r["skipped"] for r in gathered)
        _say(group, f"[recommend-all] {manifest['requests']} requests -> {manifest['rows']} "
                    f"rows in {n_shards} shards ({done} written, {n_shards - done} already "
                    f"done) in {elapsed:.1f} s -> {out_dir}")
        return manifest
    finally:
        group.close()


def _shard_path(out_dir: Path, s: int, n: int) -> Path:
    return out_dir / f"part-{s:05d}-of-{n:05d}.parquet"


def _comparable(settings: dict) -> dict:
    return {k: v for k, v in settings.items()
            if k not in ("shard", "num_shards", "batch_size", "backend", "rows", "requests",
                         "not_applicable", "nothing_left")}


def _check_folder(out_dir: Path, settings: dict) -> None:
    """Every shard and manifest already in ``out_dir`` must come from the same settings (each
    rank checks the same files, so all ranks fail alike)."""
    manifest = out_dir / "_manifest.json"
    found = []
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())
        except ValueError as exc:
            raise ValueError(f"{manifest} is not valid JSON ({exc}); delete it") from None
        mine = {k: v for k, v in settings.items() if k != "model"}
        if {k: old.get(k) for k in mine} != mine:
            found.append(manifest.name)
    for p in sorted(out_dir.glob("part-*.parquet")):
        meta = None
        try:
            meta = read_shard_settings(p)
        except Exception:  # noqa: BLE001 - an unreadable file is as foreign as another run's
            pass
        if meta is None or _comparable(meta) != settings:
            found.append(p.name)
    if found:
        raise ValueError(f"{out_dir} holds recommendations made with other settings (or "
                         f"another model): {found[:3]}{' ...' if len(found) > 3 else ''}; "
                         f"use another --out folder or delete them")


def _finished(path: Path, settings: dict) -> bool:
    if not path.is_file():
        return False
    meta = read_shard_settings(path)
    return meta is not None and _comparable(meta) == settings


def _compute_shard(rb, backend, users, tasks, top_n, batch_size, exclude_seen, RequestError,
                   pa, bar):
    """One shard's rows: requests of whole users batched together."""
    ds = rb.ds
    cols = {c: [] for c in COLUMNS}
    stats = {"requests": 0, "not_applicable": 0, "nothing_left": 0}
    batch: list = []   # (user id, task, sample)

    def flush():
        if not batch:
            return
        out = backend([s for _, _, s in batch], top_n=top_n)
        ids = out.item_ids.numpy() if hasattr(out.item_ids, "numpy") else np.asarray(
            out.item_ids)
        scores = out.scores.numpy() if hasattr(out.scores, "numpy") else np.asarray(out.scores)
        for r, (uid, task, _) in enumerate(batch):
            rank = 0
            for i, sc in zip(ids[r, :top_n].tolist(), scores[r, :top_n].tolist()):
                if i < 0:
                    continue
                rank += 1
                cols["user_id"].append(uid)
                cols["task"].append(task)
                cols["rank"].append(rank)
                cols["item_id"].append(ds.item_ids[i])
                cols["title"].append(ds.item_titles[i])
                cols["score"].append(sc)
        batch.clear()

    for uid in users:
        applicable = set(rb.user_tasks(uid))
        mine = []
        for task in tasks:
            if task not in applicable:
                stats["not_applicable"] += 1
                continue
            try:
                mine.append((uid, task, rb.build(user=uid, task=task,
                                                 exclude_seen=exclude_seen)))
            except RequestError:  # the task's subset minus the seen items is empty
                stats["nothing_left"] += 1
        if batch and len(batch) + len(mine) > batch_size:
            flush()
        batch.extend(mine)
        stats["requests"] += len(mine)
        if len(batch) >= batch_size:
            flush()
        bar.update(1)
    flush()
    table = pa.table({
        "user_id": pa.array(cols["user_id"], pa.string()),
        "task": pa.array(cols["task"], pa.string()),
        "rank": pa.array(cols["rank"], pa.int32()),
        "item_id": pa.array(cols["item_id"], pa.string()),
        "title": pa.array(cols["title"], pa.string()),
        "score": pa.array(cols["score"], pa.float32()),
    })
    stats["rows"] = table.num_rows
    return table, stats
