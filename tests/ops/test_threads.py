"""The thread governor: thread counts follow the CPUs other processes leave free."""

import os

import pytest
import torch

import sigma_fast as sf
from sigma_fast import _threads


@pytest.fixture
def fake_proc(monkeypatch):
    """Scripted /proc readings: each call returns the next (all-CPU busy ticks, own ticks),
    and time advances one second per reading."""
    readings, clock = [], [0.0]

    def busy():
        return readings.pop(0)

    def monotonic():
        clock[0] += 1.0
        return clock[0]

    monkeypatch.setattr(_threads, "_busy_ticks", busy)
    monkeypatch.setattr(_threads.time, "monotonic", monotonic)
    monkeypatch.setattr(_threads, "affinity_cpus", lambda: 4)
    monkeypatch.setattr(_threads, "_pinned", False)
    before = (torch.get_num_threads(), sf.get_num_threads())
    yield readings
    torch.set_num_threads(before[0])
    sf.backends()  # the core is loaded
    from sigma_fast._backends import load_core

    load_core().set_num_threads(before[1])


def test_governor_uses_the_cpus_others_leave_free(fake_proc):
    hz = os.sysconf("SC_CLK_TCK")
    # one second between readings: others use 3, then 1, then 0 CPUs
    fake_proc += [(0, 0), (4 * hz, 1 * hz), (6 * hz, 2 * hz), (7 * hz, 3 * hz)]
    gov = _threads.ThreadGovernor(period=0.0, maximum=4)
    assert gov.check(force=True) == 1 and torch.get_num_threads() == 1
    assert sf.get_num_threads() == 1
    assert gov.check(force=True) == 3
    assert gov.check(force=True) == 4 and torch.get_num_threads() == 4
    assert gov.changes == 2


def test_without_proc_readings_all_cpus_are_used(monkeypatch):
    monkeypatch.setattr(_threads, "_busy_ticks", lambda: None)
    before = torch.get_num_threads()
    try:
        gov = _threads.ThreadGovernor(period=0.0, maximum=2)
        assert gov.check(force=True) == 2
    finally:
        torch.set_num_threads(before)


def test_an_explicit_thread_count_stops_adapting(monkeypatch):
    monkeypatch.setattr(_threads, "_pinned", False)
    monkeypatch.setattr(_threads, "_governor", None)
    before = sf.get_num_threads()
    try:
        assert _threads.adapt() is not None
        sf.set_num_threads(1)
        assert _threads.adapt() is None and sf.get_num_threads() == 1
    finally:
        sf.set_num_threads(before)


def test_free_cpus_is_within_the_affinity_mask():
    assert 1 <= _threads.free_cpus(0.05) <= _threads.affinity_cpus()
