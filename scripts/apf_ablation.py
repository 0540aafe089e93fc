"""APF against a fixed fusion temperature on one trained run, paired per request.

    python scripts/apf_ablation.py RUN_DIR [--split test] [--set eval.num_beams=26 ...]

Ranks the run's evaluation samples with the ``sigma`` model twice — adaptive temperature
σ(φ)/τ (APF) and the fixed 1/τ (the ``no_apf`` variant) — and prints, per task and over all
samples, HR@10 and NDCG@10 of both and their paired difference (APF − fixed) with a 95 %
bootstrap interval over users; then the same difference by tercile of the request's prefix-score
spread σ(φ) (the standard deviation of its K step-1 log-probabilities), where APF departs most
from a fixed temperature. Writes RUN_DIR/eval/apf_ablation.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> int:
    from sigma_fast._io import atomic_write_json
    from sigma_fast.apps.cli import _overrides  # --set SECTION.KEY=VALUE, as the CLI parses it
    from sigma_fast.rec import pipeline
    from sigma_fast.rec.evaluation import evaluate_rankings, paired_difference
    from sigma_fast.rec.generate import Recommender

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--split", default=None, choices=["valid", "test"])
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args(argv)
    overrides = _overrides(args.set)
    if args.split:
        overrides.setdefault("eval", {})["split"] = args.split
    cfg = pipeline.run_config(args.run, overrides=overrides)
    e = cfg["eval"]
    ds = pipeline._dataset(cfg)
    samples = pipeline._eval_samples(ds, cfg)
    model = pipeline.load_variant(args.run, "sigma")
    out, spread = {}, None
    for name, adaptive in (("apf", True), ("fixed", False)):
        rec = Recommender(model, num_beams=e["num_beams"], top_m=e["top_m"], adaptive=adaptive,
                          batch_size=32)
        res = rec(samples, top_n=e["top_n"], progress=False)
        out[name] = res.item_ids.numpy()
        if spread is None:
            s = res.prefix_scores.numpy().astype(np.float64)
            s = np.where(np.isfinite(s), s, np.nan)
            spread = np.nanstd(s, axis=1)
    report: dict = {"split": e["split"], "num_beams": e["num_beams"], "top_m": e["top_m"]}
    for name in ("apf", "fixed"):
        report[name] = evaluate_rankings(samples, out[name], hr_ks=(10,), ndcg_ks=(10,),
                                         bootstrap=e["bootstrap"])
    report["difference"] = paired_difference(samples, out["apf"], out["fixed"],
                                             n_boot=e["bootstrap"])
    cuts = np.nanquantile(spread, [1 / 3, 2 / 3])
    tercile = np.digitize(spread, cuts)
    report["by_spread"] = []
    for t in range(3):
        rows = np.flatnonzero(tercile == t)
        sub = [samples[i] for i in rows]
        d = paired_difference(sub, out["apf"][rows], out["fixed"][rows],
                              n_boot=e["bootstrap"])["all"]
        report["by_spread"].append({"sigma_phi": [float(np.nanmin(spread[rows])),
                                                  float(np.nanmax(spread[rows]))], **d})
    report["sigma_phi"] = {"mean": float(np.nanmean(spread)),
                           "median": float(np.nanmedian(spread))}
    atomic_write_json(args.run / "eval" / "apf_ablation.json", report)

    def cell(stat):
        return f"{100 * stat['mean']:+.2f} [{100 * stat['lo']:+.2f}, {100 * stat['hi']:+.2f}]"

    print(f"{'task':12s} {'n':>5s} {'HR@10 APF':>9s} {'fixed':>6s}  APF − fixed HR@10 (95 % CI)"
          f"   NDCG@10")
    for task, d in report["difference"].items():
        a, f = report["apf"][task]["HR@10"]["mean"], report["fixed"][task]["HR@10"]["mean"]
        print(f"{task:12s} {d['n']:5d} {100 * a:9.2f} {100 * f:6.2f}  {cell(d['HR@10']):>26s}"
              f"   {cell(d['NDCG@10'])}")
    print(f"by the request's σ(φ) (mean {report['sigma_phi']['mean']:.2f}, median "
          f"{report['sigma_phi']['median']:.2f}):")
    for b in report["by_spread"]:
        lo, hi = b["sigma_phi"]
        print(f"  σ(φ) in [{lo:.2f}, {hi:.2f}] n={b['n']:5d}: HR@10 {cell(b['HR@10'])}, "
              f"NDCG@10 {cell(b['NDCG@10'])}")
    print(json.dumps({"written": str(args.run / "eval" / "apf_ablation.json")}))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
