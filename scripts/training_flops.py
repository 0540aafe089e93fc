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
at that rate. Needs the run's tokenizer (``sigma-fast tokenize``). Writes
RUN_DIR/eval/training_flops.json.
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


def sigma_step_flops(cfg: dict, run: Path, batches: int) -> tuple[float, int]:
    """(mean FLOPs of one SFT step, number of training samples)."""
    from sigma_fast.rec import pipeline
    from sigma_fast.rec.data import build_task_samples
    from sigma_fast.rec.tokenization import HybridItemTokenizer

    items = HybridItemTokenizer.load(pipeline._require(
        run / "tokenizer" / pipeline._tokenizer_name("sigma"), "tokenize"))
    model = pipeline.sigma_model(cfg, items, "sigma").train()
    samples = build_task_samples(pipeline._dataset(cfg), "train", seed=cfg["data"]["seed"])
    tr = cfg["train"]
    total = 0
    for step in range(batches):
        g = torch.Generator().manual_seed(tr["seed"] * 1_000_003 + step)
        picks = torch.randint(len(samples), (tr["batch_size"],), generator=g).tolist()
        batch = model.collate([model.encode(samples[i]) for i in picks])

        def step_fn():
            model(batch, generator=g)["loss"].backward()

        total += _flops(step_fn)
        model.zero_grad(set_to_none=True)
    return total / batches, len(samples)


def sasrec_training_flops(cfg: dict) -> dict:
    from sigma_fast.rec import pipeline
    from sigma_fast.rec.baselines import SASRec

    ds = pipeline._dataset(cfg)
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
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)
    if args.batches < 1:
        raise SystemExit(f"--batches must be at least 1; got {args.batches}")
    cfg = pipeline.run_config(args.run, overrides=_overrides(args.set))
    steps = cfg["train"]["steps"]
    per_step, n_samples = sigma_step_flops(cfg, args.run, args.batches)
    sasrec = sasrec_training_flops(cfg)
    rate = matmul_rate()
    sigma = per_step * steps
    report = {
        "dataset": cfg["data"]["dataset"], "threads": torch.get_num_threads(),
        "matmul_flops_per_s": rate,
        "sigma": {"steps": steps, "batch_size": cfg["train"]["batch_size"],
                  "training_samples": n_samples, "flops_per_step": per_step, "flops": sigma,
                  "seconds_at_matmul_rate": sigma / rate},
        "sasrec": {**sasrec, "seconds_at_matmul_rate": sasrec["flops"] / rate},
        "ratio": sigma / sasrec["flops"],
    }
    print(f"{args.run} ({report['dataset']}); float32 matrix products here: {rate / 1e9:.0f} "
          f"GFLOP/s on {report['threads']} threads")
    print(f"  SIGMA : {per_step / 1e9:.2f} GFLOP per step x {steps} steps = "
          f"{sigma / 1e12:.2f} TFLOP; at that rate >= {sigma / rate:.0f} s")
    print(f"  SASRec: {sasrec['flops_per_step'] / 1e9:.3f} GFLOP per step x "
          f"{sasrec['steps_per_epoch']} steps x {sasrec['epochs']} epochs (+ validation) = "
          f"{sasrec['flops'] / 1e12:.2f} TFLOP; at that rate >= "
          f"{sasrec['flops'] / rate:.0f} s")
    print(f"  SIGMA / SASRec: {report['ratio']:.1f}x the FLOPs")
    path = args.run / "eval" / "training_flops.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, report)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
