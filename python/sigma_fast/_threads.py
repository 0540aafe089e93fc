"""How many threads to compute with when the cores are shared.

A thread team as large as the machine waits at every parallel region for its slowest member;
when another busy process holds one of the cores, that member is descheduled for a scheduler
time slice at a time, and a small model's step (thousands of short parallel regions) slows
down tenfold. Computing with the cores that are actually free avoids the waits.

``free_cpus()`` counts the CPUs of this process's affinity mask minus the CPU time other
processes used over a short window (Linux ``/proc/stat`` minus this process's own time; the time
of niced processes does not count where they yield to this one: not when it is niced too, nor
under session autogroups);
``ThreadGovernor`` re-applies that count to torch and the C++ core at most every ``period``
seconds (2) inside a long loop; the first decision of a process samples 0.1 s. An explicit thread count (``SIGMA_FAST_NUM_THREADS``,
``torch.set_num_threads`` through ``threads=``) turns the governor off.
"""

from __future__ import annotations

import os
import time

__all__ = ["ThreadGovernor", "adapt", "affinity_cpus", "free_cpus", "pin"]

_governor: "ThreadGovernor | None" = None
_pinned = bool(os.environ.get("SIGMA_FAST_NUM_THREADS"))


def pin() -> None:
    """An explicit thread count was chosen (``sigma_fast.set_num_threads``): stop adapting."""
    global _pinned
    _pinned = True


def adapt() -> int | None:
    """Called inside long loops (training steps, generation batches): keeps the thread counts
    at the number of free CPUs (see ``ThreadGovernor``), unless a count was pinned by
    ``SIGMA_FAST_NUM_THREADS`` or ``sigma_fast.set_num_threads``. Returns the count in use
    (None when pinned)."""
    global _governor
    if _pinned:
        return None
    if _governor is None:  # the first decision from a short sample, not a guess
        _governor = ThreadGovernor()
        time.sleep(0.1)
        return _governor.check(force=True)
    return _governor.check()


def affinity_cpus() -> int:
    """CPUs this process may run on (its affinity mask; all CPUs where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _busy_ticks() -> tuple[int, int] | None:
    """(busy ticks of all CPUs, ticks of this process) from /proc, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    values = [int(v) for v in fields[:8]] + [0] * max(0, 8 - len(fields))
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    busy = user + system + irq + softirq + steal
    # Niced (lower-priority) processes yield the CPU to this one, so they do not take a core
    # from it; unless this process is niced itself, or the scheduler groups processes by
    # session (autogroup), where a niced process of another session still gets an equal share.
    if _own_niceness() > 0 or _autogroup():
        busy += nice
    return busy, int(own[11]) + int(own[12])  # utime + stime


def _autogroup() -> bool:
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def _own_niceness() -> int:
    try:
        return os.getpriority(os.PRIO_PROCESS, 0)
    except (AttributeError, OSError):  # pragma: no cover - not POSIX
        return 0


class ThreadGovernor:
    """Keeps torch's and the C++ core's thread counts at the number of free CPUs.

    ``check()`` is cheap (two small reads of /proc) and acts at most every ``period`` seconds:
    it measures the CPU time other processes used since the last check and sets both thread
    counts to ``affinity - round(others)`` (at least 1, at most ``maximum``). Returns the count
    in use.
    """

    def __init__(self, *, period: float = 2.0, maximum: int | None = None):
        self.period = float(period)
        self.maximum = maximum or affinity_cpus()
        self._last = _busy_ticks()
        self._t = time.monotonic()
        self.threads: int | None = None
        self.changes = 0

    def others_busy(self) -> float | None:
        """CPUs' worth of time other processes used since the previous measurement."""
        now, t = _busy_ticks(), time.monotonic()
        if now is None or self._last is None or t - self._t < 0.1:
            return None  # no /proc, or too short a window for clock-tick counts
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        busy = (now[0] - self._last[0]) - (now[1] - self._last[1])
        elapsed = t - self._t
        self._last, self._t = now, t
        return max(0.0, busy / hz / elapsed)

    def check(self, *, force: bool = False) -> int:
        if not force and self.threads is not None and time.monotonic() - self._t < self.period:
            return self.threads
        others = self.others_busy()
        free = self.maximum if others is None else int(round(affinity_cpus() - others))
        threads = max(1, min(self.maximum, free))
        if threads != self.threads:
            self.apply(threads)
        return threads

    def apply(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        from ._backends import load_core

        core = load_core()
        if core is not None:
            core.set_num_threads(threads)
        if self.threads is not None:
            self.changes += 1
        self.threads = threads


def free_cpus(window: float = 0.2) -> int:
    """Free CPUs now: the affinity mask minus what other processes used over ``window`` s."""
    gov = ThreadGovernor()
    time.sleep(window)
    others = gov.others_busy()
    if others is None:
        return affinity_cpus()
    return max(1, int(round(affinity_cpus() - others)))
