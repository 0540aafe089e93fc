"""The HTTP server, live (uvicorn on a free port, a tiny trained model) and talked to with a
real client: answers equal to `sigma-fast recommend --json`, every error class, overload,
readiness, metrics, and concurrent requests batched together."""

import asyncio
import json
import threading
import time

import pytest
import torch

from sigma_fixtures import needs_minilm

httpx = pytest.importorskip("httpx", reason="the server tests need the [serve] extra (httpx)")
pytest.importorskip("fastapi", reason="the server tests need the [serve] extra (fastapi)")
pytest.importorskip("uvicorn", reason="the server tests need the [serve] extra (uvicorn)")

from sigma_fast.apps.cli import main  # noqa: E402
from sigma_fast.rec.generate import Recommendations  # noqa: E402
from sigma_fast.rec.requests import RequestLimits  # noqa: E402
from sigma_fast.serving import load_served  # noqa: E402
from sigma_fast.serving.http import BackgroundServer, create_app  # noqa: E402

pytestmark = [needs_minilm, pytest.mark.e2e, pytest.mark.usefixtures("one_torch_thread")]

LIMITS = RequestLimits(max_top_n=30, max_history=12)


@pytest.fixture(scope="module")
def served(tiny_run):
    return load_served(tiny_run, limits=LIMITS, batch_size=16)


@pytest.fixture(scope="module")
def url(served):
    app = create_app(served, max_batch=16, max_wait_ms=50, max_queue=64, max_body_bytes=4096)
    with BackgroundServer(app) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


def _cli(run, body, capsys) -> dict:
    args = ["recommend", "--run", str(run), "--json", "--top-n", str(body.get("top_n", 10)),
            "--task", body.get("task", "JustForYou")]
    if "user" in body:
        args += ["--user", body["user"]]
    if "history" in body:
        args += ["--history", *body["history"]]
    if "instruction" in body:
        args += ["--instruction", body["instruction"]]
    if "allowed" in body:
        args += ["--allowed", *body["allowed"]]
    if body.get("exclude_seen") is False:
        args.append("--include-seen")
    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


REQUESTS = [
    {"user": "u1", "task": "Category", "top_n": 5},
    {"user": "u3"},
    {"user": "u1", "task": "Season", "exclude_seen": False, "top_n": 7},
    {"history": ["Movie number 3", "i4", "movie NUMBER 5"], "top_n": 4},
    {"history": ["i10", "i11"], "task": "Longtail", "top_n": 6},
    {"user": "u2", "instruction": "Something funny", "allowed": ["i1", "i7", "i20", "i30"],
     "top_n": 3},
]


@pytest.mark.parametrize("body", REQUESTS, ids=lambda b: "-".join(sorted(b)))
def test_answers_equal_the_command_line(tiny_run, client, body, capsys):
    r = client.post("/recommend", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer == _cli(tiny_run, body, capsys)          # same items, order, scores
    items = answer["items"]
    assert 0 < len(items) <= body.get("top_n", 10)
    assert len({x["id"] for x in items}) == len(items)
    assert all(x["title"].startswith("Movie number") for x in items)
    if "allowed" in body:
        assert {x["id"] for x in items} <= set(body["allowed"])


BAD = [
    (b"{\"user\": ", 400, "not valid JSON"),
    (b"[1, 2]", 422, "must be a JSON object; got list"),
    ({"usr": "u1"}, 422, "unknown field 'usr'"),
    ({"user": "u1", "top_n": "3"}, 422, "top_n: Input should be a valid integer"),
    ({"history": ["i1", True]}, 422, "history[1]: Input should be a valid string"),
    ({"user": "nobody"}, 404, "unknown user 'nobody'"),
    ({"history": ["Movie numbr 3"]}, 404, "close matches: 'Movie number 3' (id 'i3')"),
    ({"user": "u1", "task": "Comedy"}, 422, "unknown task 'Comedy'"),
    ({"user": "u1", "task": "Discover"}, 422, "does not apply to user 'u1'"),
    ({"user": "u1", "allowed": ["i1", "i999"]}, 422, "not in the catalogue"),
    ({"user": "u1", "top_n": 0}, 422, "top_n must be an integer in [1, 30]"),
    ({"user": "u1", "top_n": 31}, 422, "top_n must be an integer in [1, 30]"),
    ({"history": ["i1"] * 13}, 413, "history has 13 items; at most 12"),
    ({"user": "u1", "allowed": [f"i{k % 48}" for k in range(49)]}, 413, "allowed has 49 ids"),
    ({"user": "u1", "history": ["i1"]}, 422, "exactly one of user"),
    ({}, 422, "got neither"),
    ({"history": ["i1"], "task": "Category"}, 422, "needs an instruction"),
    (b"{\"instruction\": \"" + b"x" * 5000 + b"\"}", 413, "at most 4096"),
]


@pytest.mark.parametrize("body, status, message", BAD, ids=[str(b[2]) for b in BAD])
def test_bad_requests_get_a_4xx_naming_the_problem(client, body, status, message):
    if isinstance(body, bytes):
        r = client.post("/recommend", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/recommend", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_health_info_metrics(client, served):
    assert client.get("/health").json()["status"] == "ok"
    info = client.get("/info").json()
    ds = served.dataset
    assert info["items"] == ds.item_ids and info["users"] == ds.num_users
    assert info["tasks"][0] == "JustForYou" and "u1" in info["task_users"]["Category"]
    assert info["limits"]["max_top_n"] == 30 and info["generation"]["num_beams"] == 3
    client.post("/recommend", json={"user": "nobody"})
    m = client.get("/metrics").json()
    for key in ("requests", "rejected", "batch_sizes", "latency_ms", "queue_depth",
                "responses", "queue_wait_ms"):
        assert key in m, key
    assert set(m["latency_ms"]) >= {"p50", "p95", "p99"}
    assert m["responses"]["404"] >= 1
    assert client.get("/nowhere").status_code == 404
    assert client.get("/recommend").status_code == 405


def test_concurrent_requests_are_batched_and_answered_as_alone(url, served):
    bodies = [{"user": f"u{k}", "task": "JustForYou", "top_n": 3 + k % 5} for k in range(24)]
    alone = [served.answer([(served.requests.build(user=b["user"]), b["top_n"])])[0]
             for b in bodies]
    before = httpx.get(f"{url}/metrics").json()["batch_sizes"]

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            return await asyncio.gather(*(c.post("/recommend", json=b) for b in bodies))

    answers = asyncio.run(burst())
    assert all(r.status_code == 200 for r in answers)
    after = httpx.get(f"{url}/metrics").json()["batch_sizes"]
    grown = {int(k): v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    assert max(grown) > 1, after                # several requests shared a model call
    for body, r, ref in zip(bodies, answers, alone):
        got = r.json()["items"]
        assert [x["id"] for x in got] == [x["id"] for x in ref], body
        torch.testing.assert_close(torch.tensor([x["score"] for x in got]),
                                   torch.tensor([x["score"] for x in ref]),
                                   rtol=0, atol=1e-4)


class SlowBackend:
    """A stub model: blocks until released, answers items 0..top_n-1."""

    def __init__(self):
        self.release = threading.Event()
        self.calls = []

    def __call__(self, samples, *, top_n):
        self.calls.append((len(samples), top_n))
        assert self.release.wait(60)
        ids = torch.arange(top_n).repeat(len(samples), 1)
        return Recommendations(ids, -ids.float())


def test_overload_is_rejected_with_429(tiny_run):
    backend = SlowBackend()
    served = load_served(tiny_run, backend=backend)
    app = create_app(served, max_batch=1, max_wait_ms=0, max_queue=2)
    with BackgroundServer(app) as url:
        async def flood():
            body = {"user": "u1", "exclude_seen": False, "top_n": 2}
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                tasks = [asyncio.create_task(c.post("/recommend", json=body))]
                while (await c.get("/metrics")).json()["running"] < 1:
                    await asyncio.sleep(0.01)      # the first request is in the model
                tasks += [asyncio.create_task(c.post("/recommend", json=body))
                          for _ in range(7)]
                while (await c.get("/metrics")).json()["rejected"]["queue_full"] < 5:
                    await asyncio.sleep(0.01)
                backend.release.set()
                return await asyncio.gather(*tasks)

        answers = asyncio.run(flood())
        codes = sorted(r.status_code for r in answers)
        assert codes == [200] * 3 + [429] * 5      # one running, two waiting, five turned away
        rejected = [r for r in answers if r.status_code == 429]
        assert all(r.headers["retry-after"] == "1" and "queue is full" in r.json()["error"]
                   for r in rejected)
        ok = next(r for r in answers if r.status_code == 200).json()["items"]
        assert [x["id"] for x in ok] == ["i0", "i1"]
        m = httpx.get(f"{url}/metrics").json()
        assert m["rejected"]["queue_full"] == 5 and m["responses"]["429"] == 5


def test_not_ready_failed_and_shutting_down_answer_503(tiny_run):
    go = threading.Event()

    def slow_load():
        assert go.wait(60)
        return load_served(tiny_run, backend=SlowBackend())

    app = create_app(slow_load, max_batch=4, max_wait_ms=1, max_queue=4)
    with BackgroundServer(app) as url:
        h = httpx.get(f"{url}/health")
        assert h.status_code == 503 and h.json()["status"] == "loading"
        r = httpx.post(f"{url}/recommend", json={"user": "u1"})
        assert r.status_code == 503 and "still loading" in r.json()["error"]
        assert httpx.get(f"{url}/info").status_code == 503
        go.set()
        while httpx.get(f"{url}/health").status_code != 200:
            time.sleep(0.01)
        state = app.state.sigma
        state.served.backend.release.set()
        assert httpx.post(f"{url}/recommend", json={"user": "u1"}).status_code == 200
        state.batcher.close()                     # what the shutdown does first
        r = httpx.post(f"{url}/recommend", json={"user": "u1"})
        assert r.status_code == 503 and "shutting down" in r.json()["error"]
    assert state.phase == "shutting down"

    failures = []

    def bad_load():
        raise FileNotFoundError("no model here")

    app = create_app(bad_load, on_load_error=failures.append)
    with BackgroundServer(app) as url:
        while not failures:
            time.sleep(0.01)
        h = httpx.get(f"{url}/health")
        assert h.status_code == 503 and "no model here" in h.json()["error"]
        r = httpx.post(f"{url}/recommend", json={"user": "u1"})
        assert r.status_code == 503 and "failed to load" in r.json()["error"]


def test_a_failing_model_answers_500(tiny_run):
    def broken(samples, *, top_n):
        raise RuntimeError("CUDA out of memory (simulated)")

    app = create_app(load_served(tiny_run, backend=broken))
    with BackgroundServer(app) as url:
        r = httpx.post(f"{url}/recommend", json={"user": "u1"})
        assert r.status_code == 500 and "out of memory" in r.json()["error"]
        assert httpx.get(f"{url}/health").status_code == 200


class Recording:
    def __init__(self, mode):
        self.mode, self.calls = mode, []

    def __call__(self, samples, *, top_n):
        self.calls.append((len(samples), top_n))
        ids = torch.arange(top_n).repeat(len(samples), 1)
        return Recommendations(ids, -ids.float())


@pytest.mark.parametrize("mode, calls", [("sigma", [(3, 5)]), ("gr_id", [(3, 5)]),
                                         ("gr_sid", [(2, 2), (1, 5)])])
def test_mixed_top_n_is_cut_from_the_largest_unless_gr_sid(tiny_run, mode, calls):
    backend = Recording(mode)
    served = load_served(tiny_run, backend=backend)
    sample = served.requests.build(user="u1", exclude_seen=False)
    out = served.answer([(sample, 2), (sample, 5), (sample, 2)])
    assert backend.calls == calls
    assert [[x["id"] for x in o] for o in out] == [["i0", "i1"], [f"i{k}" for k in range(5)],
                                                   ["i0", "i1"]]


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_serve_command(tiny_run, tmp_path, capsys):
    """`sigma-fast serve` in its own process: ready, answering, stopping cleanly on SIGTERM;
    a run without a model exits with an error; a missing run fails before the port opens."""
    import os
    import signal
    import subprocess
    import sys

    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sigma_fast.apps.cli", "serve", "--run-dir",
                             str(tiny_run), "--port", str(port), "--max-batch", "4",
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.1)
        body = {"user": "u5", "task": "JustForYou", "top_n": 4}
        r = httpx.post(f"{url}/recommend", json=body, timeout=60)
        assert r.status_code == 200 and r.json() == _cli(tiny_run, body, capsys)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert "ready on http://127.0.0.1:" in out and "[serve] stopped" in out

    broken = tmp_path / "nomodel"
    broken.mkdir()
    (broken / "config.toml").write_text((tiny_run / "config.toml").read_text())
    res = subprocess.run([sys.executable, "-m", "sigma_fast.apps.cli", "serve", "--run",
                          str(broken), "--port", str(_free_port()), "--log-level", "warning"],
                         env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 2 and "failed to load" in res.stderr, res.stderr
    assert main(["serve", "--run", str(tmp_path / "absent")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_the_engine_behind_the_server(tiny_run, capsys):
    """The static-shape Engine as the backend: the same answers as `recommend --engine`, the
    eager path's items, and a prompt longer than its buffers is a 413, not a failed batch."""
    from sigma_fast.serving import load_backend

    served = load_served(tiny_run, limits=LIMITS, batch_size=8, engine=True)
    assert type(served.backend).__name__ == "Engine"
    with BackgroundServer(create_app(served, max_batch=8, max_wait_ms=20)) as url:
        for body in REQUESTS[:4]:
            got = httpx.post(f"{url}/recommend", json=body, timeout=120).json()
            args = ["recommend", "--run", str(tiny_run), "--json", "--engine",
                    "--top-n", str(body.get("top_n", 10)),
                    "--task", body.get("task", "JustForYou")]
            args += ["--user", body["user"]] if "user" in body else ["--history",
                                                                    *body["history"]]
            if body.get("exclude_seen") is False:
                args.append("--include-seen")
            capsys.readouterr()
            assert main(args) == 0
            assert got == json.loads(capsys.readouterr().out)
            eager = _cli(tiny_run, body, capsys)["items"]
            assert [x["id"] for x in got["items"]] == [x["id"] for x in eager]
            torch.testing.assert_close(torch.tensor([x["score"] for x in got["items"]]),
                                       torch.tensor([x["score"] for x in eager]),
                                       rtol=0, atol=1e-4)

    small = load_served(tiny_run, limits=LIMITS,
                        backend=load_backend(tiny_run, engine=True, max_prompt=60,
                                             max_top_n=30, batch_size=4))
    with BackgroundServer(create_app(small, max_batch=4, max_wait_ms=20)) as url:
        r = httpx.post(f"{url}/recommend", json={"user": "u1", "instruction": "so " * 80})
        assert r.status_code == 413 and "prompt has" in r.json()["error"]
        assert httpx.post(f"{url}/recommend", json={"user": "u1"}).status_code == 200


def test_a_failing_request_does_not_fail_its_batch(tiny_run):
    def picky(samples, *, top_n):
        if any("poison" in s.prompt for s in samples):
            raise ValueError("this request cannot be served")
        ids = torch.arange(top_n).repeat(len(samples), 1)
        return Recommendations(ids, -ids.float())

    served = load_served(tiny_run, backend=picky)
    good = served.requests.build(user="u1", exclude_seen=False)
    bad = served.requests.build(user="u1", instruction="poison")
    out = served.answer([(good, 2), (bad, 2), (good, 3)])
    assert [x["id"] for x in out[0]] == ["i0", "i1"] and len(out[2]) == 3
    assert isinstance(out[1], ValueError)
