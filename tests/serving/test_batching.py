"""MicroBatcher: batches by size or wait, bounded queue with explicit rejections, per-request
results and errors, cancellation, shutdown, metrics."""

import asyncio
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

from sigma_fast.serving.batching import MicroBatcher, NotAccepting, QueueFull, _percentile


class Gate:
    """A batch function that blocks until released and records every batch it got."""

    def __init__(self):
        self.open = threading.Event()
        self.entered = threading.Event()
        self.batches = []

    def __call__(self, items):
        self.batches.append(list(items))
        self.entered.set()
        assert self.open.wait(30)
        return [x * 10 for x in items]


def test_results_go_to_their_requests_in_batches():
    gate = Gate()
    with MicroBatcher(gate, max_batch=4, max_wait_ms=200, max_queue=64) as b:
        first = b.submit(0)
        assert gate.entered.wait(30)          # batch [0] running: the rest queue up behind it
        futs = [b.submit(i) for i in range(1, 10)]
        gate.open.set()
        assert first.result(30) == 0 and [f.result(30) for f in futs] == [10 * i for i in
                                                                          range(1, 10)]
    assert gate.batches[0] == [0]
    assert [len(x) for x in gate.batches[1:]] == [4, 4, 1]   # full batches leave at once
    assert sum(gate.batches, []) == list(range(10))          # first come, first served
    m = b.metrics()
    assert m["batch_sizes"] == {1: 2, 4: 2} and m["completed"] == 10 and m["batches"] == 4
    assert m["accepted"] == m["requests"] == 10 and m["queue_depth"] == 0
    assert m["latency_ms"]["window"] == 10 and m["latency_ms"]["p50"] <= m["latency_ms"]["p99"]


def test_a_lone_request_does_not_wait_for_a_full_batch():
    with MicroBatcher(lambda xs: xs, max_batch=64, max_wait_ms=1, max_queue=8) as b:
        assert b.submit("x").result(30) == "x"
        assert b.metrics()["batch_sizes"] == {1: 1}


def test_full_queue_rejects_and_recovers():
    gate = Gate()
    b = MicroBatcher(gate, max_batch=1, max_wait_ms=0, max_queue=2).start()
    running = b.submit(1)
    assert gate.entered.wait(30)
    waiting = [b.submit(2), b.submit(3)]
    with pytest.raises(QueueFull, match="queue is full \\(2 requests waiting\\)"):
        b.submit(4)
    with pytest.raises(QueueFull):
        b.check_capacity()                  # the same answer before any work on a request
    m = b.metrics()
    assert m["rejected"] == {"queue_full": 2, "over_delay": 0, "not_accepting": 0}
    assert m["queue_depth"] == 2 and m["running"] == 1 and m["requests"] == 5
    gate.open.set()
    assert [f.result(30) for f in [running] + waiting] == [10, 20, 30]
    b.check_capacity()
    assert b.submit(5).result(30) == 50      # room again
    b.close()


def test_close_drains_or_fails_the_waiting_requests():
    gate = Gate()
    b = MicroBatcher(gate, max_batch=1, max_wait_ms=0, max_queue=8).start()
    running = b.submit(1)
    assert gate.entered.wait(30)
    waiting = b.submit(2)
    closer = threading.Thread(target=b.close)          # drain=True: waits for the batch
    closer.start()
    while b.accepting:
        time.sleep(0.001)
    with pytest.raises(NotAccepting, match="shutting down"):
        b.submit(3)
    gate.open.set()
    closer.join(30)
    assert running.result(30) == 10 and waiting.result(30) == 20

    gate = Gate()
    b = MicroBatcher(gate, max_batch=1, max_wait_ms=0, max_queue=8).start()
    running = b.submit(1)
    assert gate.entered.wait(30)
    waiting = b.submit(2)
    threading.Timer(0.05, gate.open.set).start()
    b.close(drain=False)
    assert running.result(30) == 10
    with pytest.raises(NotAccepting):
        waiting.result(30)
    with pytest.raises(NotAccepting, match="not accepting"):
        MicroBatcher(lambda xs: xs).submit(1)         # never started


def test_errors_fail_their_requests_only():
    def fn(items):
        if "boom" in items:
            raise RuntimeError("model exploded")
        return [ValueError(f"bad {x}") if x == "bad" else x for x in items]

    gate_items = ["a", "bad", "b"]
    b = MicroBatcher(fn, max_batch=8, max_wait_ms=50, max_queue=8).start()
    futs = [b.submit(x) for x in gate_items]
    assert futs[0].result(30) == "a" and futs[2].result(30) == "b"
    with pytest.raises(ValueError, match="bad bad"):
        futs[1].result(30)
    with pytest.raises(RuntimeError, match="model exploded"):
        b.submit("boom").result(30)
    assert b.submit("c").result(30) == "c"      # the worker survived
    b.close()
    m = b.metrics()
    assert m["failed"] >= 2 and m["completed"] >= 3

    b = MicroBatcher(lambda xs: xs[:-1], max_batch=4, max_wait_ms=0).start()
    with pytest.raises(RuntimeError, match="returned 0 results for 1 requests"):
        b.submit(1).result(30)
    b.close()


def test_cancelled_requests_are_dropped_before_their_batch():
    gate = Gate()
    b = MicroBatcher(gate, max_batch=8, max_wait_ms=0, max_queue=8).start()
    b.submit(1)
    assert gate.entered.wait(30)
    dropped, kept = b.submit(2), b.submit(3)
    assert dropped.cancel()
    gate.open.set()
    assert kept.result(30) == 30
    b.close()
    assert gate.batches == [[1], [3]] and b.metrics()["cancelled"] == 1


def test_submit_async_from_an_event_loop():
    async def main(b):
        return await asyncio.gather(*(b.submit_async(i) for i in range(20)))

    with MicroBatcher(lambda xs: [x + 1 for x in xs], max_batch=8, max_wait_ms=20,
                      max_queue=32) as b:
        assert asyncio.run(main(b)) == list(range(1, 21))
        sizes = b.metrics()["batch_sizes"]
    assert max(sizes) > 1 and sum(k * v for k, v in sizes.items()) == 20


@settings(max_examples=15, deadline=None)
@given(n=st.integers(0, 60), max_batch=st.integers(1, 9), max_queue=st.integers(1, 70),
       threads=st.integers(1, 4))
def test_every_accepted_request_gets_its_own_answer(n, max_batch, max_queue, threads):
    """Many submitters: each accepted request is answered with its own result, no batch is
    larger than max_batch, and accepted + rejected = submitted."""
    results, rejected, lock = {}, [], threading.Lock()
    b = MicroBatcher(lambda xs: [("ans", x) for x in xs], max_batch=max_batch, max_wait_ms=1,
                     max_queue=max_queue).start()

    def submitter(k):
        for i in range(k, n, threads):
            try:
                f = b.submit(i)
            except QueueFull:
                with lock:
                    rejected.append(i)
                continue
            with lock:
                results[i] = f

    ts = [threading.Thread(target=submitter, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert all(f.result(30) == ("ans", i) for i, f in results.items())
    b.close()
    m = b.metrics()
    assert len(results) + len(rejected) == n == m["requests"]
    assert m["rejected"]["queue_full"] == len(rejected)
    assert all(size <= max_batch for size in m["batch_sizes"])
    assert sum(k * v for k, v in m["batch_sizes"].items()) == len(results)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="max_batch must be an int >= 1; got 0"):
        MicroBatcher(lambda xs: xs, max_batch=0)
    with pytest.raises(ValueError, match="max_queue must be an int >= 1"):
        MicroBatcher(lambda xs: xs, max_queue=2.5)
    with pytest.raises(ValueError, match="max_wait_ms must be a finite number >= 0"):
        MicroBatcher(lambda xs: xs, max_wait_ms=-1)
    with pytest.raises(TypeError, match="fn must be callable"):
        MicroBatcher(None)
    b = MicroBatcher(lambda xs: xs).start()
    with pytest.raises(RuntimeError, match="already started"):
        b.start()
    b.close()


def test_percentile_is_nearest_rank():
    v = list(range(1, 101))
    assert [_percentile(v, q) for q in (50, 95, 99, 100)] == [50, 95, 99, 100]
    assert _percentile([], 50) is None and _percentile([7], 99) == 7


def test_a_latency_budget_sheds_load_before_the_queue_is_full():
    import threading

    from sigma_fast.serving.batching import MicroBatcher, QueueFull

    gate = threading.Event()

    def slow(xs):
        gate.wait(5)
        return xs

    with MicroBatcher(lambda xs: xs, max_batch=2, max_wait_ms=0, max_queue=100,
                      max_delay_ms=50) as b:
        assert b.submit(1).result(5) == 1          # measures ~0 ms per request: all accepted
    b = MicroBatcher(slow, max_batch=1, max_wait_ms=0, max_queue=100, max_delay_ms=50).start()
    try:
        b._per_request = 0.02                      # as measured: 20 ms per request
        futures = [b.submit(i) for i in range(3)]  # 0, 1, 2 ahead: 0 / 20 / 40 ms
        with pytest.raises(QueueFull, match="over the 50 ms budget"):
            for i in range(10):
                futures.append(b.submit(i))
        assert len(futures) < 10
        assert b.metrics()["rejected"]["over_delay"] == 1
    finally:
        gate.set()
        b.close()
    with pytest.raises(ValueError, match="max_delay_ms must be None or a finite number > 0"):
        MicroBatcher(lambda xs: xs, max_delay_ms=0)
