"""Use a run's trained SASRec item table as SIGMA's collaborative ID table.

    python scripts/sasrec_teacher.py RUN_DIR [--reground]

Reads the SASRec that ``sigma-fast evaluate`` trained and saved in RUN_DIR/baselines/sasrec and
takes its item embeddings (the item table without its padding row) as the ID table:

- by default it replaces RUN_DIR/grounding/id_embeddings.npy only: the frozen ID table that
  Proj&Fuse fuses with the grounded embeddings, and the tokenizer's collaborative input; the
  grounded embeddings stay as they were;
- with ``--reground`` it grounds again with that table as the knowledge-distillation teacher in
  place of BPR (grounded.npy, id_embeddings.npy, agreement.json are rewritten).

The table the run had before is kept once as grounding/id_embeddings.bpr.npy. Afterwards run
``sigma-fast tokenize`` and ``sigma-fast train`` on the run again. SASRec's epoch is chosen on
the validation split, so its table has seen the validation targets' ranking signal: compare on
validation with that in mind, and evaluate on test.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def main(argv=None) -> int:
    from sigma_fast._io import atomic_save_npy
    from sigma_fast.rec import pipeline
    from sigma_fast.rec.baselines import SASRec

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--reground", action="store_true",
                    help="ground again with the SASRec table as the teacher")
    args = ap.parse_args(argv)
    cfg = pipeline.run_config(args.run)
    folder = args.run / "baselines" / "sasrec"
    if not folder.is_dir():
        raise SystemExit(f"{folder}: no trained SASRec; run `sigma-fast evaluate --run "
                         f"{args.run}` first (it trains and saves the baseline)")
    gdir = args.run / "grounding"
    current = gdir / "id_embeddings.npy"
    if not current.is_file():
        raise SystemExit(f"{current}: missing; run `sigma-fast ground --run {args.run}` first")
    table = SASRec.load(folder).item_emb.weight[1:].detach().float().numpy()
    num_items = pipeline._dataset(cfg).num_items
    if table.shape[0] != num_items:
        raise SystemExit(f"{folder}: SASRec has {table.shape[0]} items, the run's dataset "
                         f"{num_items}")
    backup = gdir / "id_embeddings.bpr.npy"
    if not backup.exists():
        shutil.copyfile(current, backup)
    if args.reground:
        pipeline.ground(args.run, cfg, id_embeddings=table)
    else:
        atomic_save_npy(current, table)
    print(f"{current}: SASRec item table {list(table.shape)} "
          f"({'re-grounded with it as the teacher' if args.reground else 'ID table only'}); "
          f"the previous table is in {backup}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
