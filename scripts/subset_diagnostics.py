"""Where a trained SIGMA run loses the tasks with an allowed subset (Category, Longtail, Discover).

    python scripts/subset_diagnostics.py RUN_DIR [--split valid] [--set eval.num_beams=26 ...]

Ranks the run's evaluation samples of those tasks with the ``sigma`` model and prints, per task:

- HR@10 of three-step generation;
- prefix recall: the share of requests whose target's SID prefix is among the K step-1 beams
  (a target outside them cannot be found), and HR@10 among those requests (step 3's ranking);
- HR@10 of a flat ranking: every allowed item by its best cosine over the K query vectors,
  without the beam scores (what the prefix probabilities add);
- the same three figures after the JustForYou instruction in place of the task's own (what the
  instruction adds beyond the allowed subset, which stays the same).

Writes RUN_DIR/eval/subset_diagnostics.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

SUBSET_TASKS = ("Category", "Longtail", "Discover")


def _with_instruction(sample, instruction: str):
    from sigma_fast.rec.data.tasks import TEMPLATES

    own = TEMPLATES[sample.task][sample.template]
    for key, value in (sample.params or {}).items():
        own = own.replace("{" + key + "}", value)
    if own not in sample.prompt:
        raise ValueError(f"sample of user {sample.user}: its prompt does not contain its own "
                         f"instruction {own!r}")
    return dataclasses.replace(sample, prompt=sample.prompt.replace(own, instruction))


def _diagnose(rec, samples, k: int = 10) -> dict:
    from sigma_fast.rec.generate import allowed_masks

    model = rec.model
    out = rec(samples, top_n=k, progress=False)
    target = torch.as_tensor([s.target for s in samples])
    hit = (out.item_ids == target[:, None]).any(1).numpy()
    prefix = model.codes[target][:, :out.prefixes.shape[2]]
    recalled = (out.prefixes == prefix[:, None, :]).all(-1).any(1).numpy()
    queries = torch.nn.functional.normalize(out.queries.float(), dim=-1)
    allowed = allowed_masks(samples, model.num_items)
    vectors_t = rec.item_vectors.cpu().T
    flat = np.zeros(len(samples), dtype=bool)
    for r in range(len(samples)):
        sims = (queries[r] @ vectors_t).max(0).values
        if allowed is not None:
            sims = sims.masked_fill(~allowed[r], float("-inf"))
        flat[r] = bool((sims.topk(k).indices == target[r]).any())
    tasks = np.array([s.task for s in samples])
    report = {}
    for task in dict.fromkeys(tasks.tolist()):
        m = tasks == task
        report[task] = {
            "n": int(m.sum()), f"hr@{k}": float(hit[m].mean()),
            "prefix_recall": float(recalled[m].mean()),
            f"hr@{k}_given_prefix": float(hit[m & recalled].mean()) if (m & recalled).any()
            else float("nan"),
            f"flat_hr@{k}": float(flat[m].mean()),
        }
    return report


def main(argv=None) -> int:
    from sigma_fast._io import atomic_write_json
    from sigma_fast.apps.cli import _overrides  # --set SECTION.KEY=VALUE, as the CLI parses it
    from sigma_fast.rec import pipeline
    from sigma_fast.rec.data.tasks import TEMPLATES
    from sigma_fast.rec.generate import Recommender

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--split", default="valid", choices=["valid", "test"])
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)
    overrides = _overrides(args.set)
    overrides.setdefault("eval", {})["split"] = args.split
    cfg = pipeline.run_config(args.run, overrides=overrides)
    e = cfg["eval"]
    ds = pipeline._dataset(cfg)
    samples = [s for s in pipeline._eval_samples(ds, cfg) if s.task in SUBSET_TASKS]
    if not samples:
        raise SystemExit(f"{args.run}: no {'/'.join(SUBSET_TASKS)} samples on {args.split}")
    model = pipeline.load_variant(args.run, "sigma")
    rec = Recommender(model, num_beams=e["num_beams"], top_m=e["top_m"], batch_size=32)
    plain = TEMPLATES["JustForYou"][0]
    report = {"split": args.split, "num_beams": e["num_beams"], "top_m": e["top_m"],
              "own_instruction": _diagnose(rec, samples),
              "justforyou_instruction": _diagnose(
                  rec, [_with_instruction(s, plain) for s in samples])}
    print(f"{args.run} ({args.split}, K = {e['num_beams']}, M = {e['top_m']}); HR@10 in %")
    print(f"{'instruction':12s} {'task':9s} {'n':>6s} {'HR@10':>7s} {'prefix recall':>14s} "
          f"{'HR@10 | prefix':>15s} {'flat HR@10':>11s}")
    for which in ("own_instruction", "justforyou_instruction"):
        for task, r in report[which].items():
            print(f"{which.split('_')[0]:12s} {task:9s} {r['n']:6d} {100 * r['hr@10']:7.2f} "
                  f"{100 * r['prefix_recall']:14.2f} {100 * r['hr@10_given_prefix']:15.2f} "
                  f"{100 * r['flat_hr@10']:11.2f}")
    path = args.run / "eval" / "subset_diagnostics.json"
    atomic_write_json(path, report)  # creates eval/ when missing
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
