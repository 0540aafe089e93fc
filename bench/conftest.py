"""Shared machinery of the benchmarks: machine roofline figures measured in the same run, and a
closing table of every provider's rate next to its baselines' (the ratios are what count).

Run: python -m pytest bench/ --benchmark-only   (see bench/RESULTS.md)
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections import defaultdict

import numpy as np
import pytest
import torch

_RESULTS: dict[str, dict[str, dict]] = defaultdict(dict)


def _best_time(fn, repeat=5):
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@pytest.fixture(scope="session")
def machine():
    """This machine's measured sgemm rate (torch, all threads) and memory bandwidth."""
    a = torch.randn(2048, 2048)
    b = torch.randn(2048, 2048)
    gemm = 2 * 2048**3 / _best_time(lambda: torch.mm(a, b)) / 1e9
    src = np.ones(64 * 2**20 // 4, dtype=np.float32)  # 64 MiB, far beyond the caches
    dst = np.empty_like(src)
    copy = 2 * src.nbytes / _best_time(lambda: np.copyto(dst, src)) / 1e9  # read + write
    return {"sgemm_gflops": gemm, "mem_gbs": copy, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}


@pytest.fixture
def record(request):
    """record(group, provider, **figures): figures for the closing table. The first figure is
    the rate compared across providers of a group (higher is better)."""

    def _record(group: str, provider: str, **figures):
        _RESULTS[group][provider] = figures
        request.node.user_properties.append((group, provider, figures))

    return _record


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("sigma_fast benchmark summary (ratios against baselines measured in this run)")
    for group, providers in _RESULTS.items():
        tr.write_line(f"[{group}]")
        ours = {p: f for p, f in providers.items() if p.startswith("sigma_fast")}
        for provider, figures in providers.items():
            rate_key = next(iter(figures))
            line = f"  {provider:28s} " + "  ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
            if not provider.startswith("sigma_fast") and ours:
                for op, of in ours.items():
                    ratio = of[rate_key] / figures[rate_key] if figures[rate_key] else float("nan")
                    line += f"  | {op} is {ratio:.2f}x"
            tr.write_line(line)
    out = os.environ.get("SIGMA_FAST_BENCH_JSON")
    if out:
        with open(out, "w") as f:
            json.dump(_RESULTS, f, indent=2)
