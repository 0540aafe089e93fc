"""Training FLOPs of a run's SIGMA and of its SASRec baseline, and the least time they can take.

    python scripts/training_flops.py RUN_DIR [--batches 8] [--set SECTION.KEY=VALUE ...]

Counts the matrix products (linear layers, attention, the losses' products; elementwise work
is left out) of SIGMA's SFT steps and of SASRec's training with torch's FlopCounterMode, on
freshly initialised models of the run's configuration (the FLOPs of a step do not depend on the
weights):

- SIGMA: ``--batches`` training batches of ``train.batch_size`` samples drawn as SFT draws them
  (their padded lengths differ), forward and backward; the mean times ``train.steps``;
- SASRec: one batch of 128 windows forward and backward times the batches of an epoch, plus the
  per-epoch validation ranking, times ``eval.sasrec_epochs``.

It also measures this machine's float32 matrix-product rate (2048 × 2048 products on torch's
current threads) and divides: the least time each training could take here if every FLOP ran
at that rate. ``--set`` changes settings for this count only (the run's config.toml is left as
it is). With ``--time-steps N`` it also times N SFT steps (after 5 warm-up steps) phase
by phase — encoding, collation, forward, backward, clipping, optimizer — and reports the rate
the steps attain; ``--profile`` prints torch.profiler's top operators over 5 more steps. Run it
alone on the machine. Needs the run's tokenizer (``sigma-fast
tokenize``). Writes RUN_DIR/eval/training_flops.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


def _flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 FLOP/s of an n × n × n product on torch's current threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


PHASES = ("encode", "collate", "forward", "backward", "clip", "optimizer")


def _sigma_setup(cfg: dict, run: Path, ds):
    from sigma_fast.rec import pipeline
    from sigma_fast.rec.data import build_task_samples
    from sigma_fast.rec.tokenization import HybridItemTokenizer

    items = HybridItemTokenizer.load(pipeline._require(
        run / "tokenizer" / pipeline._tokenizer_name("sigma"), "tokenize"))
    model = pipeline.sigma_model(cfg, items, "sigma").train()
    samples = build_task_samples(ds, "train", seed=cfg["data"]["seed"])
    return model, samples


def _draw(samples, config, step: int):
    """(generator, samples) of SFT step ``step``, drawn uniformly as SFT draws them by default
    (task weights only change which samples, not the shape of a step)."""
    from sigma_fast.rec.train import step_generator

    g = step_generator(config.seed, step)
    picks = torch.randint(len(samples), (config.batch_size,), generator=g).tolist()
    return g, [samples[i] for i in picks]


def sigma_step_flops(model, samples, config, batches: int) -> float:
    """Mean FLOPs of one SFT step (forward and backward) over ``batches`` drawn batches."""
    total = 0
    for step in range(batches):
        g, drawn = _draw(samples, config, step)
        batch = model.collate([model.encode(s) for s in drawn])

        def step_fn():
            model(batch, generator=g)["loss"].backward()

        total += _flops(step_fn)
        model.zero_grad(set_to_none=True)
    return total / batches


def time_sigma_steps(model, samples, config, steps: int, warmup: int = 5) -> dict:
    """Milliseconds per SFT step in each phase, mean over ``steps`` steps after ``warmup``."""
    from sigma_fast.rec.train import _adamw

    optimizer = _adamw([p for p in model.parameters() if p.requires_grad], config)
    spent = dict.fromkeys(PHASES, 0.0)
    for step in range(warmup + steps):
        g, drawn = _draw(samples, config, 10_000 + step)
        marks = [time.perf_counter()]
        encoded = [model.encode(s) for s in drawn]
        marks.append(time.perf_counter())
        batch = model.collate(encoded)
        marks.append(time.perf_counter())
        loss = model(batch, generator=g)["loss"]
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        marks.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        if step >= warmup:
            for name, a, b in zip(PHASES, marks, marks[1:]):
                spent[name] += b - a
    return {name: 1e3 * t / steps for name, t in spent.items()}


def sasrec_training_flops(cfg: dict, ds) -> dict:
    from sigma_fast.rec import pipeline
    from sigma_fast.rec.baselines import SASRec

    shape, fit = pipeline.sasrec_settings(cfg, ds.num_items)
    model = SASRec(**shape).train()
    x_all, y_all = model._windows(ds)
    batch = 128  # SASRec.fit's default batch size
    x, y = x_all[:batch], y_all[:batch]
    gen = torch.Generator().manual_seed(0)

    def step_fn():
        hidden = model(x)
        if fit["loss"] == "softmax":
            keep = y >= 0
            loss = torch.nn.functional.cross_entropy(model.item_logits(hidden[keep]), y[keep])
        else:
            loss = model._sampled_softmax(hidden, y, fit["num_negatives"], fit["temperature"],
                                          gen)
        loss.backward()

    per_step = _flops(step_fn)
    model.eval()
    valid = model._valid_samples(ds)
    per_validation = _flops(lambda: model.rank(valid, top_n=10))
    steps = math.ceil(len(x_all) / batch)
    epochs = fit["epochs"]
    return {"windows": len(x_all), "steps_per_epoch": steps, "epochs": epochs,
            "flops_per_step": per_step, "flops_per_validation": per_validation,
            "flops": epochs * (steps * per_step + per_validation)}


def main(argv=None) -> int:
    from sigma_fast._io import atomic_write_json
    from sigma_fast.apps.cli import _overrides  # --set SECTION.KEY=VALUE, as the CLI parses it
    from sigma_fast.rec import pipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--batches", type=int, default=8, help="SFT batches to average over")
    ap.add_argument("--time-steps", type=int, default=0, metavar="N",
                    help="also time N SFT steps phase by phase (0 = no timing)")
    ap.add_argument("--profile", action="store_true",
                    help="also print torch.profiler's top operators over 5 SFT steps")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)
    if args.batches < 1:
        raise SystemExit(f"--batches must be at least 1; got {args.batches}")
    if args.time_steps < 0:
        raise SystemExit(f"--time-steps must be 0 or more; got {args.time_steps}")
    cfg = pipeline.run_config(args.run, overrides=_overrides(args.set), write=False)
    config = pipeline.train_config(cfg)
    steps = config.steps
    ds = pipeline._dataset(cfg)  # loaded once for both models
    model, samples = _sigma_setup(cfg, args.run, ds)
    per_step = sigma_step_flops(model, samples, config, args.batches)
    sasrec = sasrec_training_flops(cfg, ds)
    rate = matmul_rate()
    sigma = per_step * steps
    report = {
        "dataset": cfg["data"]["dataset"], "threads": torch.get_num_threads(),
        "matmul_flops_per_s": rate,
        "sigma": {"steps": steps, "batch_size": config.batch_size,
                  "training_samples": len(samples), "flops_per_step": per_step, "flops": sigma,
                  "seconds_at_matmul_rate": sigma / rate},
        "sasrec": {**sasrec, "seconds_at_matmul_rate": sasrec["flops"] / rate},
        "ratio": sigma / sasrec["flops"],
    }
    if args.time_steps:
        ms = time_sigma_steps(model, samples, config, args.time_steps)
        report["sigma"]["step_ms"] = ms
        report["sigma"]["attained_flops_per_s"] = per_step / (sum(ms.values()) / 1e3)
    print(f"{args.run} ({report['dataset']}); float32 matrix products here: {rate / 1e9:.0f} "
          f"GFLOP/s on {report['threads']} threads")
    print(f"  SIGMA : {per_step / 1e9:.2f} GFLOP per step x {steps} steps = "
          f"{sigma / 1e12:.2f} TFLOP; at that rate >= {sigma / rate:.0f} s")
    print(f"  SASRec: {sasrec['flops_per_step'] / 1e9:.3f} GFLOP per step x "
          f"{sasrec['steps_per_epoch']} steps x {sasrec['epochs']} epochs (+ validation) = "
          f"{sasrec['flops'] / 1e12:.2f} TFLOP; at that rate >= "
          f"{sasrec['flops'] / rate:.0f} s")
    print(f"  SIGMA / SASRec: {report['ratio']:.1f}x the FLOPs")
    if args.time_steps:
        ms = report["sigma"]["step_ms"]
        print(f"  SIGMA step: {sum(ms.values()):.1f} ms (" + ", ".join(
            f"{k} {v:.1f}" for k, v in ms.items()) + f"); attains "
            f"{report['sigma']['attained_flops_per_s'] / 1e9:.0f} GFLOP/s")
    path = args.run / "eval" / "training_flops.json"
    atomic_write_json(path, report)  # creates eval/ when missing; before the optional profile
    print(f"written: {path}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            time_sigma_steps(model, samples, config, 5, warmup=0)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    sys.exit(main())
