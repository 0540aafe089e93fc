"""``sigma-fast loadtest``: a load generator for the HTTP server (httpx's async client).

Two modes:

- **open loop** (``--rate R --duration S``): requests are sent on a Poisson schedule of R per
  second whatever the server does, as independent users would send them; a request's latency
  counts from its *scheduled* time, so a server that falls behind is not flattered by the
  client waiting for it (no coordinated omission).
- **closed loop** (``--closed N --duration S``): N clients each send their next request as soon
  as the previous one is answered — the server's maximum throughput.

Requests are drawn (seeded) from the server's ``GET /info``: a task, then a user it applies to;
a share of them (``--history-fraction``) send a history of random catalogue ids instead, and a
share (``--allowed-fraction``) restrict the answer to a random half of the catalogue. Every
answer is checked: items outside the catalogue or outside the request's allowed ids are
*illegal*, an item twice in an answer a *duplicate*.

The report: requests sent, answered, achieved requests/s, latency p50/p95/p99 of the answered
ones, rejections (429 queue full, 503 not ready / shutting down), other errors by status, and
the illegal / duplicate item counts.

>>> report = run_loadtest("http://127.0.0.1:8000", rate=20, duration=10)
>>> report["achieved_rps"], report["latency_ms"]["p99"], report["rejected"]
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import random
import time

__all__ = ["run_loadtest", "format_report", "RequestMix"]


def _httpx():
    try:
        import httpx
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"the load generator needs httpx ({exc}); install it with: "
                                  f"pip install 'sigma_fast[serve]'") from None
    return httpx


class RequestMix:
    """Seeded request bodies drawn from a server's ``/info``."""

    def __init__(self, info: dict, *, top_n: int = 10, allowed_fraction: float = 0.25,
                 history_fraction: float = 0.1, seed: int = 0):
        for name, value in (("allowed_fraction", allowed_fraction),
                            ("history_fraction", history_fraction)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {value!r}")
        self.items = list(info["items"])
        self.catalogue = frozenset(self.items)
        self.pairs = [(t, u) for t, us in info["task_users"].items() for u in us]
        self.tasks = [t for t, us in info["task_users"].items() if us]
        self.by_task = info["task_users"]
        if not self.tasks or not self.items:
            raise ValueError("the server's /info lists no users or no items to draw from")
        self.top_n = top_n
        self.allowed_fraction, self.history_fraction = allowed_fraction, history_fraction
        self.rng = random.Random(seed)

    def next(self) -> dict:
        rng = self.rng
        if rng.random() < self.history_fraction:
            body = {"history": rng.sample(self.items, min(len(self.items), rng.randint(1, 10))),
                    "task": "JustForYou"}
        else:
            task = rng.choice(self.tasks)
            body = {"user": rng.choice(self.by_task[task]), "task": task}
        if rng.random() < self.allowed_fraction:
            n = len(self.items)
            body["allowed"] = rng.sample(self.items, rng.randint(max(1, n // 4), max(1, n // 2)))
        body["top_n"] = self.top_n
        return body


def _percentiles(values) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    v = sorted(values)
    at = lambda q: v[max(0, math.ceil(q / 100 * len(v)) - 1)]  # noqa: E731 - nearest rank
    return {"p50": round(at(50) * 1e3, 3), "p95": round(at(95) * 1e3, 3),
            "p99": round(at(99) * 1e3, 3), "max": round(v[-1] * 1e3, 3),
            "mean": round(sum(v) / len(v) * 1e3, 3)}


class _Tally:
    def __init__(self, catalogue):
        self.catalogue = catalogue
        self.latency: list[float] = []
        self.lag: list[float] = []      # open loop: actual send time - scheduled time
        self.status = collections.Counter()
        self.transport = collections.Counter()
        self.sent = 0
        self.illegal = 0
        self.duplicates = 0
        self.short = 0
        self.checked = 0
        self.last_done = 0.0
        self.examples: list[str] = []

    def check(self, body: dict, answer) -> None:
        items = answer.get("items") if isinstance(answer, dict) else None
        if not isinstance(items, list):
            self.status["bad answer"] += 1
            return
        ids = [x.get("id") for x in items if isinstance(x, dict)]
        allowed = set(body["allowed"]) if "allowed" in body else None
        bad = [i for i in ids if i not in self.catalogue or (allowed is not None
                                                              and i not in allowed)]
        self.illegal += len(bad)
        self.duplicates += len(ids) - len(set(ids))
        self.short += len(ids) < body["top_n"]
        self.checked += 1
        if bad and len(self.examples) < 5:
            self.examples.append(f"illegal items {bad[:3]} for {json.dumps(body)[:200]}")


async def _one(client, tally: _Tally, body: dict, start: float, timeout: float) -> None:
    httpx = _httpx()
    tally.sent += 1
    tally.lag.append(time.perf_counter() - start)
    try:
        r = await client.post("/recommend", json=body, timeout=timeout)
    except httpx.HTTPError as exc:
        tally.transport[type(exc).__name__] += 1
        return
    done = time.perf_counter()
    tally.last_done = max(tally.last_done, done)
    tally.status[r.status_code] += 1
    if r.status_code == 200:
        tally.latency.append(done - start)
        try:
            tally.check(body, r.json())
        except ValueError:
            tally.status["bad answer"] += 1
    elif len(tally.examples) < 5 and r.status_code not in (429, 503):
        tally.examples.append(f"{r.status_code} {r.text[:200]} for {json.dumps(body)[:200]}")


async def _run(url, *, rate, duration, closed, top_n, allowed_fraction, history_fraction,
               seed, timeout, max_connections) -> dict:
    httpx = _httpx()
    limits = httpx.Limits(max_connections=max_connections,
                          max_keepalive_connections=max_connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        try:
            r = await client.get("/info")
        except httpx.HTTPError as exc:
            raise RuntimeError(f"cannot reach the server at {url}: {exc}") from None
        if r.status_code != 200:
            raise RuntimeError(f"{url}/info answered {r.status_code}: {r.text[:300]}")
        mix = RequestMix(r.json(), top_n=top_n, allowed_fraction=allowed_fraction,
                         history_fraction=history_fraction, seed=seed)
        tally = _Tally(mix.catalogue)
        t0 = time.perf_counter()
        if closed:
            deadline = t0 + duration

            async def client_loop():
                while time.perf_counter() < deadline:
                    await _one(client, tally, mix.next(), time.perf_counter(), timeout)

            await asyncio.gather(*(client_loop() for _ in range(closed)))
        else:
            rng = random.Random(seed + 1)
            pending, t = [], 0.0
            while True:
                t += rng.expovariate(rate)
                if t >= duration:
                    break
                wait = t0 + t - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                pending.append(asyncio.create_task(_one(client, tally, mix.next(), t0 + t,
                                                        timeout)))
            await asyncio.gather(*pending)
        elapsed = max(tally.last_done, t0 + duration) - t0 if tally.last_done else duration
    ok = tally.status.get(200, 0)
    rejected = {"429": tally.status.get(429, 0), "503": tally.status.get(503, 0)}
    errors = {str(k): v for k, v in tally.status.items() if k not in (200, 429, 503)}
    errors.update({f"transport:{k}": v for k, v in tally.transport.items()})
    return {
        "url": url, "mode": "closed" if closed else "open",
        "concurrency": closed or None, "offered_rps": None if closed else rate,
        "duration_s": duration, "elapsed_s": round(elapsed, 3),
        "sent": tally.sent, "ok": ok, "achieved_rps": round(ok / elapsed, 3) if elapsed else 0,
        "latency_ms": _percentiles(tally.latency),
        # how late the client sent (open loop): large values mean the client, not the
        # server, could not keep up with the schedule, and the figures are not the server's
        "send_lag_ms": None if closed else _percentiles(tally.lag),
        "rejected": rejected, "errors": errors,
        "answers_checked": tally.checked, "illegal_items": tally.illegal,
        "duplicate_items": tally.duplicates, "short_answers": tally.short,
        "examples": tally.examples,
    }


def run_loadtest(url: str, *, rate: float | None = None, duration: float = 10.0,
                 closed: int | None = None, top_n: int = 10, allowed_fraction: float = 0.25,
                 history_fraction: float = 0.1, seed: int = 0, timeout: float = 60.0,
                 max_connections: int | None = None) -> dict:
    """Load ``url`` (a running ``sigma-fast serve``) open-loop at ``rate`` requests/s, or
    closed-loop with ``closed`` clients, for ``duration`` seconds; returns the report."""
    if (rate is None) == (not closed):
        raise ValueError("give exactly one of rate (open loop, requests/s) or closed (the "
                         "number of concurrent clients)")
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a positive number of requests/s; got {rate!r}")
    if closed is not None and (isinstance(closed, bool) or not isinstance(closed, int)
                               or closed < 1):
        raise ValueError(f"closed must be a number of clients >= 1; got {closed!r}")
    if not (math.isfinite(duration) and duration > 0):
        raise ValueError(f"duration must be a positive number of seconds; got {duration!r}")
    if max_connections is None:
        max_connections = closed or 256
    return asyncio.run(_run(url.rstrip("/"), rate=rate, duration=duration, closed=closed,
                            top_n=top_n, allowed_fraction=allowed_fraction,
                            history_fraction=history_fraction, seed=seed, timeout=timeout,
                            max_connections=max_connections))


def format_report(r: dict) -> str:
    lat = r["latency_ms"]
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    head = (f"closed loop, {r['concurrency']} clients" if r["mode"] == "closed"
            else f"open loop, {r['offered_rps']:g} requests/s offered (Poisson)")
    lines = [
        f"{r['url']}: {head}, {r['duration_s']:g} s",
        f"  sent {r['sent']}, answered {r['ok']}: {r['achieved_rps']:.2f} requests/s",
        f"  latency ms: p50 {fmt(lat['p50'])}  p95 {fmt(lat['p95'])}  p99 {fmt(lat['p99'])}  "
        f"max {fmt(lat['max'])}",
        f"  rejected: {r['rejected']['429']} (429 queue full), {r['rejected']['503']} (503)",
    ]
    if r["send_lag_ms"] is not None:
        lag = r["send_lag_ms"]
        lines.append(f"  client send lag ms: p50 {fmt(lag['p50'])}  p99 {fmt(lag['p99'])}"
                     + ("  (the client fell behind its schedule)" if (lag["p99"] or 0) > 100
                        else ""))
    lines += [
        f"  errors: {r['errors'] or 0}",
        f"  answers checked {r['answers_checked']}: {r['illegal_items']} illegal items, "
        f"{r['duplicate_items']} duplicates, {r['short_answers']} answers shorter than top_n",
    ]
    lines += [f"  e.g. {e}" for e in r["examples"]]
    return "\n".join(lines)
