"""The load generator against a live server: open and closed loop reports, and its checks
catching illegal and duplicate items."""

import json

import pytest
import torch

from sigma_fixtures import needs_minilm

pytest.importorskip("httpx", reason="the load generator needs the [serve] extra (httpx)")
pytest.importorskip("fastapi", reason="the server needs the [serve] extra (fastapi)")
pytest.importorskip("uvicorn", reason="the server needs the [serve] extra (uvicorn)")

from sigma_fast.apps.cli import main  # noqa: E402
from sigma_fast.apps.loadtest import RequestMix, format_report, run_loadtest  # noqa: E402
from sigma_fast.rec.generate import Recommendations  # noqa: E402
from sigma_fast.serving import load_served  # noqa: E402
from sigma_fast.serving.http import BackgroundServer, create_app  # noqa: E402

pytestmark = [needs_minilm, pytest.mark.e2e, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def url(tiny_run):
    app = create_app(load_served(tiny_run), max_batch=8, max_wait_ms=5, max_queue=64)
    with BackgroundServer(app) as u:
        yield u


def _consistent(r):
    answered = r["ok"] + sum(r["rejected"].values()) + sum(r["errors"].values())
    assert answered == r["sent"], r
    assert r["answers_checked"] == r["ok"]


def test_open_loop(url):
    r = run_loadtest(url, rate=15, duration=1.5, top_n=5, allowed_fraction=0.5,
                     history_fraction=0.3, seed=1)
    _consistent(r)
    assert r["mode"] == "open" and r["offered_rps"] == 15 and r["sent"] > 0
    assert r["ok"] == r["sent"] and r["errors"] == {} and r["rejected"] == {"429": 0, "503": 0}
    assert r["illegal_items"] == 0 and r["duplicate_items"] == 0
    lat = r["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert "open loop, 15 requests/s offered" in format_report(r)


def test_closed_loop_json_from_the_command_line(url, capsys):
    capsys.readouterr()
    assert main(["loadtest", "--url", url, "--closed", "3", "--duration", "1",
                 "--top-n", "4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    _consistent(r)
    assert r["mode"] == "closed" and r["concurrency"] == 3 and r["ok"] >= 3
    assert r["achieved_rps"] > 0 and r["illegal_items"] == r["duplicate_items"] == 0


class Liar:
    """A stub model answering items 0, 0, 1, 2 ... whatever the request allows."""

    def __call__(self, samples, *, top_n):
        ids = torch.arange(top_n).repeat(len(samples), 1)
        ids[:, 1] = 0
        return Recommendations(ids, -ids.float())


def test_illegal_and_duplicate_items_are_counted(tiny_run, capsys):
    app = create_app(load_served(tiny_run, backend=Liar()), max_batch=8, max_wait_ms=1)
    with BackgroundServer(app) as url:
        r = run_loadtest(url, closed=2, duration=0.5, top_n=4, allowed_fraction=1.0,
                         history_fraction=0.0, seed=3)
        assert r["duplicate_items"] == r["ok"] > 0
        assert r["illegal_items"] > 0 and r["examples"]
        capsys.readouterr()
        assert main(["loadtest", "--url", url, "--closed", "1", "--duration", "0.3",
                     "--allowed-fraction", "1"]) == 1            # a failed check fails the run
        assert "illegal items" in capsys.readouterr().out


def test_request_mix_is_seeded_and_arguments_checked():
    info = {"items": [f"i{k}" for k in range(20)],
            "task_users": {"JustForYou": ["u1", "u2"], "Category": ["u2"], "Discover": []}}
    a = [RequestMix(info, seed=5).next() for _ in range(1)]
    mix1, mix2 = RequestMix(info, seed=5), RequestMix(info, seed=5)
    seq = [mix1.next() for _ in range(50)]
    assert seq == [mix2.next() for _ in range(50)] and a[0] == seq[0]
    assert {b.get("task") for b in seq} <= {"JustForYou", "Category"}
    assert any("allowed" in b for b in seq) and any("history" in b for b in seq)
    with pytest.raises(ValueError, match="exactly one of rate"):
        run_loadtest("http://127.0.0.1:9", rate=1, closed=2)
    with pytest.raises(ValueError, match="rate must be a positive"):
        run_loadtest("http://127.0.0.1:9", rate=0)
    with pytest.raises(ValueError, match="allowed_fraction must be in"):
        RequestMix(info, allowed_fraction=2)
    with pytest.raises(RuntimeError, match="cannot reach the server"):
        run_loadtest("http://127.0.0.1:9", rate=1, duration=0.1)
