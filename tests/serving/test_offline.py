"""recommend-all: Parquet shards of every user x task; two processes (torchrun's environment,
and torchrun itself) write exactly what one process writes; reruns skip finished shards; a
user's tasks share a batch. Also `train` under the real torchrun (the --run-dir spelling, rank
0 alone reporting)."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from sigma_fixtures import needs_minilm

pa = pytest.importorskip("pyarrow", reason="recommend-all writes Parquet with pyarrow "
                                           "(the [serve] extra)")
import pyarrow.parquet as pq  # noqa: E402

from sigma_fast.rec.data.tasks import TASKS  # noqa: E402
from sigma_fast.serving import recommend_all  # noqa: E402
from sigma_fast.serving.offline import COLUMNS, read_shard_settings  # noqa: E402

pytestmark = [needs_minilm, pytest.mark.e2e, pytest.mark.usefixtures("one_torch_thread")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    # one pinned thread per process, as the in-process run (exact equality needs the same
    # thread count: torch's reductions are split by it)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SIGMA_FAST_NUM_THREADS": "1", **extra}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in extra:
            env.pop(key, None)
    return env


def _read(folder):
    return pq.read_table(folder)      # every part-*.parquet; _manifest.json is ignored


@pytest.fixture(scope="module")
def single(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("offline") / "one"
    manifest = recommend_all(tiny_run, out, top_n=5, shard_users=16, batch_size=14,
                             progress=False)
    return out, manifest


def test_shards_cover_every_user_and_task(tiny_run, single):
    from sigma_fast.rec.pipeline import request_builder
    from sigma_fast.serving import run_settings

    out, manifest = single
    rb = request_builder(run_settings(tiny_run))
    ds = rb.ds
    files = sorted(p.name for p in out.iterdir())
    assert files == ["_manifest.json"] + [f"part-{s:05d}-of-00004.parquet" for s in range(4)]
    assert json.loads((out / "_manifest.json").read_text()) == manifest
    t = _read(out)
    assert t.column_names == list(COLUMNS)
    rows = t.to_pylist()
    pairs = {(r["user_id"], r["task"]) for r in rows}
    want = {(u, task) for u in ds.user_ids for task in rb.user_tasks(u)}
    assert pairs == want and manifest["requests"] == len(want)
    assert manifest["not_applicable"] == len(ds.user_ids) * len(TASKS) - len(want)
    assert manifest["rows"] == len(rows) == sum(s["rows"] for s in manifest["shards"])
    # ordered by user (dataset order), task (TASKS order), rank; ranks 1..n, no duplicates
    key = [(ds.user_ids.index(r["user_id"]), TASKS.index(r["task"]), r["rank"]) for r in rows]
    assert key == sorted(key)
    by_pair = {}
    for r in rows:
        by_pair.setdefault((r["user_id"], r["task"]), []).append(r)
    for (user, task), rs in by_pair.items():
        assert [r["rank"] for r in rs] == list(range(1, len(rs) + 1)) and len(rs) <= 5
        assert len({r["item_id"] for r in rs}) == len(rs)
        sample = rb.build(user=user, task=task)
        allowed = {ds.item_ids[i] for i in sample.allowed}
        assert {r["item_id"] for r in rs} <= allowed            # seen items excluded
        scores = [r["score"] for r in rs]
        assert scores == sorted(scores, reverse=True)
    meta = read_shard_settings(out / "part-00000-of-00004.parquet")
    assert meta["top_n"] == 5 and meta["shard"] == 0 and meta["rows"] > 0


def test_the_same_answer_as_recommend(tiny_run, single, capsys):
    from sigma_fast.apps.cli import main

    rows = [r for r in _read(single[0]).to_pylist()
            if r["user_id"] == "u7" and r["task"] == "Category"]
    capsys.readouterr()
    assert main(["recommend", "--run", str(tiny_run), "--user", "u7", "--task", "Category",
                 "--top-n", "5", "--json"]) == 0
    items = json.loads(capsys.readouterr().out)["items"]
    assert [r["item_id"] for r in rows] == [x["id"] for x in items]
    np.testing.assert_allclose([r["score"] for r in rows], [x["score"] for x in items],
                               rtol=0, atol=1e-4)   # float32 storage; batches of several users


def test_two_processes_write_what_one_writes(tiny_run, single, tmp_path):
    one = _read(single[0])
    out = tmp_path / "two"
    port = _free_port()
    args = [sys.executable, "-m", "sigma_fast.apps.cli", "recommend-all", "--run-dir",
            str(tiny_run), "--out", str(out), "--top-n", "5", "--shard-users", "16",
            "--batch-size", "14", "--quiet"]
    procs = [subprocess.Popen(args, env=_env(WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r),
                                             MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    outs = [p.communicate(timeout=600)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    assert "requests ->" in outs[0] and "requests ->" not in outs[1]   # rank 0 reports
    two = _read(out)
    assert two.equals(one)                                             # exactly
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["rows"] == one.num_rows
    assert not [p for p in out.iterdir() if p.name.startswith(".")]   # no temporary files


def test_under_torchrun(tiny_run, single, tmp_path):
    """The documented form: torchrun's own launcher, the --run-dir spelling."""
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "-m", "sigma_fast.apps.cli", "recommend-all",
           "--run-dir", str(tiny_run), "--out", str(out), "--top-n", "5",
           "--shard-users", "16", "--batch-size", "14", "--quiet"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("requests ->") == 1, res.stdout
    assert _read(out).equals(_read(single[0]))


def test_a_rerun_skips_finished_shards(tiny_run, single, tmp_path, capsys):
    out = tmp_path / "again"
    shutil.copytree(single[0], out)
    (out / "part-00002-of-00004.parquet").unlink()          # an interrupted run
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    manifest = recommend_all(tiny_run, out, top_n=5, shard_users=16, batch_size=14,
                             progress=False)
    assert [s["skipped"] for s in manifest["shards"]] == [True, True, False, True]
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in before.items())
    assert _read(out).equals(_read(single[0]))
    assert "1 written, 3 already done" in capsys.readouterr().out
    with pytest.raises(ValueError, match="other settings"):
        recommend_all(tiny_run, out, top_n=6, shard_users=16, progress=False)


def test_a_users_tasks_share_a_batch(tiny_run, tmp_path):
    from sigma_fast.rec.generate import Recommendations
    import torch

    calls = []

    def backend(samples, *, top_n):
        calls.append([s.user for s in samples])
        ids = torch.arange(top_n).repeat(len(samples), 1)
        return Recommendations(ids, -ids.float())

    manifest = recommend_all(tiny_run, tmp_path / "stub", top_n=3, shard_users=7,
                             batch_size=9, backend=backend, progress=False)
    owner = {}
    for k, users in enumerate(calls):
        assert len(users) <= 9
        for u in users:
            assert owner.setdefault(u, k) == k      # every user in one call only
    assert sum(map(len, calls)) == manifest["requests"]


def test_bad_arguments(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="tasks must be names from"):
        recommend_all(tiny_run, tmp_path / "x", tasks=["Nope"])
    with pytest.raises(ValueError, match="shard_users must be an int >= 1"):
        recommend_all(tiny_run, tmp_path / "x", shard_users=0)
    with pytest.raises(ValueError, match="split must be 'valid' or 'test'"):
        recommend_all(tiny_run, tmp_path / "x", split="train")
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        recommend_all(tmp_path / "nothing", tmp_path / "x")


def test_train_under_torchrun_reports_once(tiny_run, tmp_path):
    """`torchrun ... train --run-dir DIR` starts (torchrun would take --run for its
    --run-path), trains with DDP and only rank 0 prints and saves."""
    run = tmp_path / "run"
    run.mkdir()
    for part in ("config.toml", "data", "grounding", "tokenizer"):
        src = tiny_run / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, run / part)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "-m", "sigma_fast.apps.cli", "train",
           "--run-dir", str(run), "--set", "train.steps=2", "--set", "train.batch_size=4",
           "--quiet"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("[train] sigma done") == 1, res.stdout
    assert res.stdout.count("[train] sigma:") == 1, res.stdout
    assert (run / "models" / "sigma" / "sigma_model.json").is_file()


def test_the_engine_writes_the_same_items(tiny_run, single, tmp_path):
    manifest = recommend_all(tiny_run, tmp_path / "engine", top_n=5, shard_users=16,
                             batch_size=14, engine=True, progress=False)
    assert read_shard_settings(tmp_path / "engine" / "part-00000-of-00004.parquet")[
        "backend"] == "Engine"
    one, eng = _read(single[0]).to_pydict(), _read(tmp_path / "engine").to_pydict()
    assert manifest["rows"] == len(one["item_id"])
    assert eng["item_id"] == one["item_id"] and eng["user_id"] == one["user_id"]
    np.testing.assert_allclose(eng["score"], one["score"], rtol=0, atol=1e-4)
