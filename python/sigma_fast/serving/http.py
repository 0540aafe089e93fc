"""The HTTP front end (FastAPI + uvicorn; ``pip install sigma_fast[serve]``): a thin shell
around a :class:`~sigma_fast.serving.backend.Served` run and a
:class:`~sigma_fast.serving.batching.MicroBatcher`.

Endpoints:

- ``POST /recommend`` — JSON ``{"user": id}`` or ``{"history": [title or item id, ...]}``, with
  ``"task"`` (one of the seven; default JustForYou) and/or ``"instruction"`` (free text),
  optional ``"allowed"`` (raw item ids), ``"top_n"`` (default 10) and ``"exclude_seen"``
  (default true) → ``{"items": [{"id", "title", "score"}, ...]}``, best first, ids as in the
  dataset's atomic files. The answer equals ``sigma-fast recommend --json`` for the same request
  (see :mod:`sigma_fast.rec.requests` for how a request becomes a prompt).
- ``GET /health`` — 200 ``{"status": "ok"}`` when ready; 503 while loading, after a failed load,
  or when shutting down.
- ``GET /metrics`` — requests, rejections, batch-size histogram, latency and queue-wait
  percentiles (ms, recent window), queue depth, responses by status.
- ``GET /info`` — dataset, variant, limits, the catalogue's item ids, the tasks and, per task,
  the users it applies to without an instruction (what a load generator needs).

Status codes: 400 body not JSON; 404 unknown user or item (with close matches); 413 body,
history, allowed list or instruction too large; 422 anything else malformed (unknown field or
task, wrong type, top_n out of range, allowed ids outside the catalogue, nothing left to
recommend …); 429 queue full (``Retry-After``); 503 not ready or shutting down; 500 a failure of
the model. Every error body is ``{"error": message}``.

>>> app = create_app(lambda: load_served("runs/demo"), max_batch=16, max_wait_ms=5)
>>> serve("runs/demo", port=8000)          # = sigma-fast serve --run runs/demo --port 8000
"""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import sys
import threading
import time
from contextlib import asynccontextmanager
from typing import Callable

from .batching import MicroBatcher, NotAccepting, QueueFull

__all__ = ["create_app", "serve", "BackgroundServer", "RecommendBody"]

try:  # the optional [serve] extra; a clear message when it is missing
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, ValidationError
except ModuleNotFoundError as _exc:  # pragma: no cover - exercised without the extra
    _MISSING = _exc
    BaseModel, ConfigDict = object, dict  # the class below still defines
else:
    _MISSING = None


def _require_extra():
    if _MISSING is not None:
        raise ModuleNotFoundError(f"the HTTP server needs fastapi and uvicorn ({_MISSING}); "
                                  f"install them with: pip install 'sigma_fast[serve]'")


class RecommendBody(BaseModel):
    """The body of ``POST /recommend``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user: str | int | None = None
    history: list[str | int] | None = None
    task: str | None = None
    instruction: str | None = None
    allowed: list[str | int] | None = None
    top_n: int = 10
    exclude_seen: bool = True


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _validation_message(exc) -> str:
    """One line per offending field: unknown fields named, union branches collapsed."""
    seen, parts = set(), []
    for e in exc.errors():
        field = str(e["loc"][0]) if e["loc"] else "body"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown field {field!r} (fields: "
                         f"{', '.join(RecommendBody.model_fields)})")
            continue
        # later loc entries: list indices, and the union branch tried ("str", "int")
        where = field + "".join(f"[{x}]" for x in e["loc"][1:] if isinstance(x, int))
        if where in seen:
            continue
        seen.add(where)
        parts.append(f"{where}: {e['msg']} (got {e.get('input')!r:.80})")
    return "invalid request: " + "; ".join(parts)


class _State:
    def __init__(self):
        self.served = None
        self.batcher: MicroBatcher | None = None
        self.phase = "starting"            # loading | ready | failed | shutting down
        self.error: str | None = None
        self.responses: collections.Counter = collections.Counter()
        self.started = time.monotonic()
        self.info: dict | None = None


def create_app(load, *, max_batch: int = 16, max_wait_ms: float = 5.0, max_queue: int = 256,
               max_delay_ms: float | None = None, max_body_bytes: int = 1 << 20,
               on_load_error: Callable | None = None):
    """The FastAPI application serving ``load`` — a ``Served`` run, or a function returning
    one, called on a background thread at start-up (``/health`` says 503 "loading" meanwhile;
    a failure is reported there and passed to ``on_load_error``)."""
    _require_extra()
    MicroBatcher(lambda xs: xs, max_batch=max_batch, max_wait_ms=max_wait_ms,
                 max_queue=max_queue, max_delay_ms=max_delay_ms)  # checks the limits now
    if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be an int >= 1; got {max_body_bytes!r}")
    state = _State()

    def ready(served):
        batcher = MicroBatcher(served.answer, max_batch=max_batch, max_wait_ms=max_wait_ms,
                               max_queue=max_queue, max_delay_ms=max_delay_ms,
                               name="sigma-fast-batcher").start()
        state.served, state.batcher = served, batcher
        state.info = _info(served, max_body_bytes)
        state.phase = "ready"

    def load_in_background():
        try:
            served = load()
            if state.phase == "loading":  # not when the server stopped meanwhile
                ready(served)
        except BaseException as exc:  # noqa: BLE001 - reported by /health and the callback
            state.phase, state.error = "failed", f"{type(exc).__name__}: {exc}"
            if on_load_error is not None:
                on_load_error(exc)

    @asynccontextmanager
    async def lifespan(app):
        if callable(load) and not hasattr(load, "answer"):
            state.phase = "loading"
            threading.Thread(target=load_in_background, name="sigma-fast-loader",
                             daemon=True).start()
        else:
            ready(load)
        try:
            yield
        finally:
            state.phase = "shutting down"
            if state.batcher is not None:
                await asyncio.to_thread(state.batcher.close, drain=True)

    app = FastAPI(title="sigma_fast", lifespan=lifespan,
                  description="SIGMA generative recommendation over HTTP")
    app.state.sigma = state
    app.add_middleware(_CountResponses, counter=state.responses)

    @app.exception_handler(_HTTPError)
    async def http_error(request: Request, exc: _HTTPError):
        return JSONResponse({"error": exc.message}, status_code=exc.status,
                            headers=exc.headers)

    def not_ready() -> _HTTPError:
        why = {"loading": "the model is still loading", "starting": "the server is starting",
               "shutting down": "the server is shutting down",
               "failed": f"the model failed to load: {state.error}"}[state.phase]
        return _HTTPError(503, f"not ready: {why}", {"Retry-After": "1"})

    @app.get("/health")
    async def health():
        if state.phase != "ready":
            return JSONResponse({"status": state.phase, "error": state.error},
                                status_code=503)
        return {"status": "ok", "variant": state.served.variant,
                "queue_depth": state.batcher.metrics()["queue_depth"]}

    @app.get("/metrics")
    async def metrics():
        m = state.batcher.metrics() if state.batcher is not None else {}
        return {"status": state.phase, "uptime_s": round(time.monotonic() - state.started, 3),
                **m, "responses": dict(sorted(state.responses.items()))}

    @app.get("/info")
    async def info():
        if state.phase != "ready":
            raise not_ready()
        return state.info

    @app.post("/recommend", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": RecommendBody.model_json_schema()}}}})
    async def recommend(request: Request):
        if state.phase != "ready":
            raise not_ready()
        body = await _read_body(request, max_body_bytes)
        try:  # shed load before parsing: a full queue costs a rejection, not a request's work
            state.batcher.check_capacity()
        except QueueFull as exc:
            raise _HTTPError(429, str(exc), {"Retry-After": "1"}) from None
        except NotAccepting as exc:
            raise _HTTPError(503, str(exc), {"Retry-After": "1"}) from None
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _HTTPError(400, f"the body must be a JSON object; it is not valid JSON: "
                                  f"{exc}") from None
        if not isinstance(data, dict):
            raise _HTTPError(422, f"the body must be a JSON object; got "
                                  f"{type(data).__name__}")
        try:
            req = RecommendBody.model_validate(data)
        except ValidationError as exc:
            raise _HTTPError(422, _validation_message(exc)) from None
        from ..rec.requests import RequestError

        rb = state.served.requests
        try:
            top_n = rb.check_top_n(req.top_n)
            sample = rb.build(user=req.user, history=req.history, task=req.task,
                              instruction=req.instruction, allowed=req.allowed,
                              exclude_seen=req.exclude_seen)
            state.served.check(sample)
        except RequestError as exc:
            raise _HTTPError(exc.status, str(exc)) from None
        try:
            items = await state.batcher.submit_async((sample, top_n))
        except QueueFull as exc:
            raise _HTTPError(429, str(exc), {"Retry-After": "1"}) from None
        except NotAccepting as exc:
            raise _HTTPError(503, str(exc), {"Retry-After": "1"}) from None
        except Exception as exc:  # noqa: BLE001 - the model failed on this batch
            raise _HTTPError(500, f"the model failed: {type(exc).__name__}: {exc}") from None
        return JSONResponse({"items": items})   # plain json.dumps: no re-encoding pass

    return app


class _CountResponses:
    """Pure ASGI middleware counting responses by status (cheaper than an ``http``
    middleware, which runs every request through extra tasks and streams)."""

    def __init__(self, app, counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.counter[str(message["status"])] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _HTTPError(413, f"the body has {declared} bytes; at most {limit} are accepted")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _HTTPError(413, f"the body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _info(served, max_body_bytes: int) -> dict:
    from ..rec.data.tasks import TASKS

    ds, rb = served.dataset, served.requests
    lim = rb.limits
    return {
        "dataset": ds.name, "variant": served.variant, "split": rb.split,
        "users": len(ds.user_ids), "items": list(ds.item_ids), "tasks": list(TASKS),
        "task_users": rb.task_users(),
        "limits": {"max_top_n": lim.max_top_n, "max_history": lim.max_history,
                   "max_allowed": lim.max_allowed or ds.num_items,
                   "max_instruction_chars": lim.max_instruction_chars,
                   "max_body_bytes": max_body_bytes},
        "generation": {"num_beams": served.cfg["eval"]["num_beams"],
                       "top_m": served.cfg["eval"]["top_m"],
                       "backend": type(served.backend).__name__},
    }


def serve(run_dir, *, variant: str = "sigma", device=None, host: str = "127.0.0.1",
          port: int = 8000, max_batch: int = 16, max_wait_ms: float = 5.0,
          max_queue: int = 256, max_delay_ms: float | None = None,
          max_connections: int = 1024, limits=None, engine: bool = True,
          log_level: str = "info") -> int:
    """Serve a trained run until interrupted (SIGINT / SIGTERM drain the queue first).
    The port opens at once; the model loads in the background (``/health`` 503 until then);
    a failed load stops the server and returns 2. Beyond ``max_connections`` open
    connections uvicorn itself answers 503, so a flood of clients cannot grow memory
    either."""
    _require_extra()
    import uvicorn

    from .backend import load_served

    failure = []
    server_box = []

    def on_error(exc):
        failure.append(exc)
        print(f"sigma-fast serve: error: the model failed to load: {exc}", file=sys.stderr)
        if server_box:
            server_box[0].should_exit = True

    def load():
        served = load_served(run_dir, variant, device, limits=limits, batch_size=max_batch,
                             engine=engine)
        print(f"[serve] {variant} of {run_dir} ready on http://{host}:{port} "
              f"({type(served.backend).__name__}, max batch {max_batch}, max wait "
              f"{max_wait_ms} ms, queue {max_queue})", flush=True)
        return served

    app = create_app(load, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                     max_delay_ms=max_delay_ms, on_load_error=on_error)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           limit_concurrency=max_connections,
                                           timeout_graceful_shutdown=30))
    server_box.append(server)
    # uvicorn drains, then re-raises the signal that stopped it: end quietly instead (exit 0)
    stop_signals = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop_signals.append(signum))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not failure:
        print("[serve] stopped", flush=True)
    return 2 if failure else 0


class BackgroundServer:
    """Run an app with uvicorn on a thread (tests, benchmarks): ``with BackgroundServer(app)
    as url: ...``; port 0 picks a free port. Leaving the block shuts the server down
    gracefully."""

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning", ready_timeout: float = 120.0):
        _require_extra()
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port,
                                                    log_level=log_level, lifespan="on"))
        self.host, self.ready_timeout = host, ready_timeout
        self.thread: threading.Thread | None = None
        self.url: str | None = None

    def start(self) -> str:
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.ready_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start (see its log above)")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self.url

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc):
        self.stop()
