"""Micro-batching with back-pressure: requests wait in a bounded queue; one worker thread takes
up to ``max_batch`` of them — as soon as that many are waiting, or when the oldest has waited
``max_wait_ms`` — and runs the batch function on them. A full queue rejects at once
(:class:`QueueFull`, HTTP 429); a closed one too (:class:`NotAccepting`, HTTP 503). Memory and
waiting time stay bounded: at most ``max_queue`` requests wait, and each waits for at most
``ceil(max_queue / max_batch) + 1`` batches.

>>> b = MicroBatcher(lambda xs: [x * 2 for x in xs], max_batch=8, max_wait_ms=2, max_queue=64)
>>> b.start()
>>> b.submit(21).result()            # a concurrent.futures.Future; or: await b.submit_async(21)
42
>>> b.metrics()["batch_sizes"]       # {size: count}
{1: 1}
>>> b.close()

The batch function ``fn(list[item]) -> list[result]`` runs on the worker thread (one per model:
a model call releases the GIL for most of its work, so the event loop keeps serving). It returns
one result per item, in order; a result that is an exception instance fails that request only;
an exception raised by ``fn`` (or a wrong number of results) fails the whole batch. Requests
cancelled while waiting (a client that went away) are dropped before the batch is formed.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from concurrent.futures import Future

__all__ = ["MicroBatcher", "QueueFull", "NotAccepting"]


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` requests: retry later (HTTP 429)."""


class NotAccepting(RuntimeError):
    """The batcher is not running (not started yet, or shutting down) (HTTP 503)."""


class _Request:
    __slots__ = ("item", "future", "t_submit")

    def __init__(self, item, future, t_submit):
        self.item, self.future, self.t_submit = item, future, t_submit


def _percentile(sorted_values, q: float) -> float | None:
    """Nearest-rank percentile of a sorted list (None when empty)."""
    if not sorted_values:
        return None
    k = max(0, math.ceil(q / 100.0 * len(sorted_values)) - 1)
    return sorted_values[k]


class MicroBatcher:
    """Bounded queue + one worker thread forming batches by size or waiting time.

    Args:
        fn: batch function ``fn(list[item]) -> list[result]`` (see the module docstring).
        max_batch: most requests per call of ``fn``.
        max_wait_ms: longest a request waits for others to join its batch (0: take whatever
            is waiting when the worker is free).
        max_queue: most requests waiting (not yet in a running batch); more are rejected.
        max_delay_ms: optional latency budget: a request is also rejected when the requests
            ahead of it would take longer than this to serve at the recently measured rate
            (seconds per request over the last well-filled batches), so that overload is shed
            while the
            accepted requests keep a bounded latency, whatever ``max_queue`` allows.
        window: the latency percentiles cover the last ``window`` completed requests.
        name: the worker thread's name.
    """

    def __init__(self, fn, *, max_batch: int = 16, max_wait_ms: float = 5.0,
                 max_queue: int = 256, max_delay_ms: float | None = None, window: int = 4096,
                 name: str = "micro-batcher"):
        if not callable(fn):
            raise TypeError(f"fn must be callable; got {type(fn).__name__}")
        for key, value in (("max_batch", max_batch), ("max_queue", max_queue),
                           ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an int >= 1; got {value!r}")
        if not (isinstance(max_wait_ms, (int, float)) and math.isfinite(max_wait_ms)
                and max_wait_ms >= 0):
            raise ValueError(f"max_wait_ms must be a finite number >= 0; got {max_wait_ms!r}")
        if max_delay_ms is not None and not (isinstance(max_delay_ms, (int, float))
                                             and math.isfinite(max_delay_ms) and max_delay_ms > 0):
            raise ValueError(f"max_delay_ms must be None or a finite number > 0; got "
                             f"{max_delay_ms!r}")
        self.fn = fn
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_delay = None if max_delay_ms is None else float(max_delay_ms) / 1e3
        self._per_request = None   # seconds per request, moving average over recent batches
        self.max_wait = float(max_wait_ms) / 1e3
        self.name = name
        self._queue: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._accepting = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._latency = collections.deque(maxlen=window)   # seconds, submit -> result
        self._queue_wait = collections.deque(maxlen=window)  # seconds, submit -> batch start
        self._batch_sizes: collections.Counter = collections.Counter()
        self._counts = collections.Counter()
        self._running = 0          # requests in the batch being computed
        self._started_at: float | None = None

    # ------------------------------------------------------------------------ lifecycle
    def start(self) -> "MicroBatcher":
        with self._cond:
            if self._thread is not None:
                raise RuntimeError(f"{self.name} is already started")
            self._accepting, self._stopping = True, False
            self._started_at = time.monotonic()
            self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            self._thread.start()
        return self

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting; with ``drain`` finish the waiting requests, else fail them with
        :class:`NotAccepting`; then stop the worker (waiting at most ``timeout`` s)."""
        with self._cond:
            self._accepting = False
            if not drain:
                self._fail_waiting(NotAccepting(f"{self.name} is shutting down"))
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    @property
    def accepting(self) -> bool:
        return self._accepting

    # --------------------------------------------------------------------------- submit
    def check_capacity(self) -> None:
        """Raise (and count) the rejection :meth:`submit` would raise now, so a caller can shed
        load before doing any work on the request (:meth:`submit` still decides)."""
        with self._cond:
            if not self._accepting:
                self._counts["rejected_not_accepting"] += 1
                raise NotAccepting(f"{self.name} is not accepting requests "
                                   f"({'shutting down' if self._stopping else 'not started'})")
            if len(self._queue) >= self.max_queue:
                self._counts["rejected_queue_full"] += 1
                raise QueueFull(f"{self.name}: the queue is full ({self.max_queue} requests "
                                f"waiting); retry later")
            ahead = len(self._queue) + self._running
            if (self.max_delay is not None and self._per_request is not None
                    and ahead * self._per_request > self.max_delay):
                self._counts["rejected_over_delay"] += 1
                raise QueueFull(f"{self.name}: {ahead} requests ahead would take about "
                                f"{ahead * self._per_request * 1e3:.0f} ms, over the "
                                f"{self.max_delay * 1e3:.0f} ms budget; retry later")

    def submit(self, item) -> Future:
        """Queue one request; its result (or exception) arrives on the returned future.
        Raises :class:`QueueFull` or :class:`NotAccepting` instead of queueing."""
        fut: Future = Future()
        with self._cond:
            self.check_capacity()      # the condition's lock is reentrant
            self._counts["accepted"] += 1
            self._queue.append(_Request(item, fut, time.monotonic()))
            if len(self._queue) >= self.max_batch or len(self._queue) == 1:
                self._cond.notify()
        return fut

    async def submit_async(self, item):
        """:meth:`submit` for asyncio code: awaits the result. Cancelling the awaiting task
        drops the request if its batch has not started."""
        return await asyncio.wrap_future(self.submit(item))

    # --------------------------------------------------------------------------- worker
    def _fail_waiting(self, exc: BaseException) -> None:
        while self._queue:
            r = self._queue.popleft()
            if r.future.set_running_or_notify_cancel():
                r.future.set_exception(exc)
                self._counts["failed"] += 1

    def _take_batch(self) -> list[_Request] | None:
        """Block until a batch is due; None when stopping with nothing left."""
        with self._cond:
            while True:
                while not self._queue:
                    if self._stopping:
                        return None
                    self._cond.wait()
                due = self._queue[0].t_submit + self.max_wait
                while len(self._queue) < self.max_batch and not self._stopping:
                    left = due - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = []
                while self._queue and len(batch) < self.max_batch:
                    r = self._queue.popleft()
                    if r.future.set_running_or_notify_cancel():
                        batch.append(r)
                    else:
                        self._counts["cancelled"] += 1
                if batch:
                    self._running = len(batch)
                    return batch

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            t0 = time.monotonic()
            try:
                results = self.fn([r.item for r in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.name}: the batch function returned "
                                       f"{len(results)} results for {len(batch)} requests")
            except BaseException as exc:  # noqa: BLE001 - delivered to every waiting request
                results = [exc] * len(batch)
            t1 = time.monotonic()
            failed = sum(isinstance(res, BaseException) for res in results)
            # Metrics first, so that a caller who has its result sees its batch counted.
            with self._cond:
                self._running = 0
                # The rate of well-filled batches (the one overload sees): small batches cost
                # more per request and would make the budget shed ever more.
                per = (t1 - t0) / len(batch)
                if self._per_request is None:
                    self._per_request = per
                elif 2 * len(batch) >= self.max_batch:
                    self._per_request = 0.7 * self._per_request + 0.3 * per
                self._batch_sizes[len(batch)] += 1
                self._counts["batches"] += 1
                self._counts["completed"] += len(batch) - failed
                self._counts["failed"] += failed
                self._counts["busy_ns"] += int((t1 - t0) * 1e9)
                for r in batch:
                    self._latency.append(t1 - r.t_submit)
                    self._queue_wait.append(t0 - r.t_submit)
            for r, res in zip(batch, results):
                if isinstance(res, BaseException):
                    r.future.set_exception(res)
                else:
                    r.future.set_result(res)

    # -------------------------------------------------------------------------- metrics
    def metrics(self) -> dict:
        """Counters since start, the batch-size histogram, and latency / queue-wait
        percentiles (ms) over the last ``window`` requests."""
        with self._cond:
            c = dict(self._counts)
            lat = sorted(self._latency)
            wait = sorted(self._queue_wait)
            sizes = dict(sorted(self._batch_sizes.items()))
            depth, running = len(self._queue), self._running
        ms = lambda v: None if v is None else round(v * 1e3, 3)  # noqa: E731
        batches = c.get("batches", 0)
        uptime = time.monotonic() - self._started_at if self._started_at else 0.0
        return {
            "requests": c.get("accepted", 0) + c.get("rejected_queue_full", 0)
            + c.get("rejected_over_delay", 0) + c.get("rejected_not_accepting", 0),
            "accepted": c.get("accepted", 0),
            "completed": c.get("completed", 0),
            "failed": c.get("failed", 0),
            "cancelled": c.get("cancelled", 0),
            "rejected": {"queue_full": c.get("rejected_queue_full", 0),
                         "over_delay": c.get("rejected_over_delay", 0),
                         "not_accepting": c.get("rejected_not_accepting", 0)},
            "queue_depth": depth,
            "running": running,
            "batches": batches,
            "batch_sizes": sizes,
            "mean_batch_size": (sum(k * v for k, v in sizes.items()) / batches
                                if batches else None),
            "latency_ms": {"window": len(lat), **{f"p{q}": ms(_percentile(lat, q))
                                                  for q in (50, 95, 99)},
                           "max": ms(lat[-1] if lat else None)},
            "queue_wait_ms": {f"p{q}": ms(_percentile(wait, q)) for q in (50, 95, 99)},
            "busy_fraction": (c.get("busy_ns", 0) / 1e9 / uptime) if uptime > 0 else None,
            "limits": {"max_batch": self.max_batch, "max_wait_ms": self.max_wait * 1e3,
                       "max_queue": self.max_queue,
                       "max_delay_ms": None if self.max_delay is None else self.max_delay * 1e3},
            "ms_per_request": ms(self._per_request),
        }
