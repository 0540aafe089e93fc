"""The SIGMA pipeline over a run directory: prepare → ground → tokenize → train → evaluate, and
``recommend`` from a trained run. Every stage reads the run's ``config.toml`` and the previous
stages' artifacts, writes its own (atomically) and can be re-run alone.

Run directory layout::

    run/config.toml                 the full configuration (every default written out)
    run/data/                       dataset summary, task statistics
    run/grounding/                  text features, ID (BPR) embeddings, grounded embeddings,
                                    agreement report
    run/tokenizer/<name>/           hybrid item tokenizers (RQ + item tables) per variant input
    run/train/<variant>/            SFT checkpoints and history
    run/models/<variant>/           trained SIGMA models (save_pretrained)
    run/baselines/                  SASRec weights
    run/eval/                       results.json, results.md, one PNG per task

Variants: ``sigma`` (SID1ID), ``sigma_l2`` (prefix length 2), ``gr_sid`` (full SID + dedup),
``gr_id`` (``<q>`` retrieval over the catalogue), ``no_grounding`` (raw text embeddings in place
of grounded ones), ``no_apf`` (the ``sigma`` model with a fixed APF temperature). Baselines:
``most_popular``, ``sasrec``.
"""

from __future__ import annotations

import copy
import json
import os
import time
import tomllib
from pathlib import Path

import numpy as np

from .._io import atomic_save_npy, atomic_write_bytes, atomic_write_json, load_npy
from .data.tasks import TASKS

__all__ = ["DEFAULTS", "VARIANTS", "BASELINES", "load_config", "write_config", "prepare",
           "ground", "tokenize", "train", "evaluate", "load_variant", "request_builder",
           "recommend_items", "recommend_for", "demo"]

VARIANTS = ("sigma", "sigma_l2", "gr_sid", "gr_id", "no_grounding", "no_apf")
BASELINES = ("most_popular", "sasrec")

# Every setting with its default; `sigma-fast <cmd> --config file.toml` overrides any of them.
DEFAULTS: dict[str, dict] = {
    "data": {
        "dataset": "ml-100k",       # built-in name (ml-100k, ml-1m) or a folder of atomic files
        "max_history": 20,          # history items per prompt (most recent)
        "min_rating": 0.0,          # implicit feedback: keep ratings >= this (0 = all)
        "seed": 0,                  # template / genre choices of the tasks
    },
    "grounding": {
        "encoder": "minilm",        # text tower: minilm, smollm2, hashed, or a HF model folder
        "train_layers": 0,          # also train the LM's last n layers (features cached once)
        "dim": 64,                  # grounded embedding size
        "epochs": 10,
        "pairs_per_epoch": 0,       # pairs drawn per epoch (0 = every view pair once)
        "tau": 0.05,                # InfoNCE temperature of L_CL and L_KD
        "lam": 1.0,                 # weight of L_KD
        "id_dim": 64,               # BPR teacher size
        "id_epochs": 10,
        "seed": 0,
    },
    "tokenizer": {
        "num_levels": 4,            # RQ levels of the full SID
        "codebook_size": 0,         # 0 = clamp(round(N / 64), 8, 256)
        "iters": 20,
        "seed": 0,
    },
    "model": {
        "backbone": "tiny",         # tiny, smollm2-135m, or a HF causal-LM folder
        "num_layers": 0,            # keep the first n layers of a pretrained backbone (0 = all)
        "hidden_size": 64,          # tiny only (64 and 5,000 steps: see docs/results.md)
        "tau": 0.07,                # <q> / item InfoNCE temperature (and APF's tau)
        "nce_weight": 1.0,
        "hard_negatives": 16,       # same-prefix negatives per sample (negatives = "prefix")
        "negatives": "prefix",      # <q> InfoNCE negatives: prefix (hard + batch) or catalogue
        "subset_negatives": False,  # catalogue negatives from the sample's allowed subset
        "subset_weight": 0.0,       # extra InfoNCE inside the allowed subset (beside negatives)
        "dense_weight": 1.0,        # dense supervision: every history item is also a target
        "trainable_ids": True,      # a trained per-item vector added to each item's ṽ
        "lora_rank": 0,             # > 0: fine-tune a pretrained backbone with LoRA (peft)
        "lora_layers": 0,           # LoRA on the first n layers (0 = all)
    },
    "train": {
        "steps": 5000,
        "batch_size": 32,
        "grad_accum": 1,
        "lr": 2e-3,
        "weight_decay": 0.01,
        "warmup": 0.05,
        "eval_every": 500,
        "eval_samples": 200,
        "save_every": 500,
        "seed": 0,
        "task_balance": 0.0,        # batch mix: 0 = tasks by size, 1 = every task alike
        "task_weights": {t: 1.0 for t in TASKS},  # extra sampling weight per task
        "variants": ["sigma"],      # which variants `train` trains
    },
    "eval": {
        "split": "test",
        "variants": ["sigma"],      # plus the baselines below
        "baselines": ["most_popular", "sasrec"],
        "max_users": 0,             # evaluate the first n users only (0 = all)
        "num_beams": 32,            # K prefixes (step 1)
        "top_m": 100,               # M items per prefix bucket (step 3)
        "top_n": 20,
        "bootstrap": 1000,
        "exclude_seen": True,       # items the user already consumed are not candidates
        "sasrec_epochs": 40,        # SASRec keeps its epoch with the best validation NDCG@10
        "sasrec_lr": 2e-3,
        "sasrec_dim": 64,
        "sasrec_heads": 2,
        "sasrec_loss": "sampled",   # sampled (softmax over the target and uniform negatives)
                                    # or softmax (whole catalogue)
        "sasrec_negatives": 128,    # uniform negatives per sequence (sampled softmax)
        "sasrec_normalize": True,   # cosine of L2-normalised embeddings
        "sasrec_temperature": 0.05, # logits / temperature
    },
}


# ------------------------------------------------------------------------------- config
def _merge(base: dict, over: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key not in out:
            raise ValueError(f"unknown setting '{where}{key}'; known: {sorted(out)}")
        if isinstance(out[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"setting '{where}{key}' must be a table; got {value!r}")
            out[key] = _merge(out[key], value, f"{where}{key}.")
        else:
            expected = type(out[key])
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ValueError(f"setting '{where}{key}' must be {expected.__name__}; got "
                                 f"{value!r}")
            out[key] = value
    return out


def load_config(path=None, overrides: dict | None = None) -> dict:
    """DEFAULTS, then a TOML file, then ``overrides`` (same nesting); unknown keys and wrong
    types are errors naming the key."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist"
                                    + (" (it is a directory)" if path.is_dir() else ""))
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path} is not a TOML file: byte {exc.start} is not valid UTF-8 "
                             f"({exc.reason})") from None
        try:
            table = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from exc
        try:
            cfg = _merge(cfg, table)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    if overrides:
        cfg = _merge(cfg, overrides)
    for v in cfg["train"]["variants"] + cfg["eval"]["variants"]:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; expected names from {VARIANTS}")
    if cfg["eval"]["top_n"] < 20:
        raise ValueError(f"eval.top_n must be >= 20 (HR@20 and NDCG@20 are reported); got "
                         f"{cfg['eval']['top_n']}")
    for b in cfg["eval"]["baselines"]:
        if b not in BASELINES:
            raise ValueError(f"unknown baseline {b!r}; expected names from {BASELINES}")
    return cfg


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}"
                               for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def config_toml(cfg: dict) -> str:
    lines = []
    for section, table in cfg.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        lines.append("")
    return "\n".join(lines)


def write_config(run_dir, cfg: dict) -> Path:
    path = Path(run_dir) / "config.toml"
    atomic_write_bytes(path, config_toml(cfg).encode())
    return path


def run_config(run_dir, config=None, overrides=None, *, write: bool = True) -> dict:
    """The run's configuration: an explicit ``config`` file wins, else the run's own
    ``config.toml``, else the defaults; ``overrides`` on top. Written back to the run unless
    ``write`` is false (a what-if that must leave the run as it is)."""
    run_dir = Path(run_dir)
    own = run_dir / "config.toml"
    cfg = load_config(config if config is not None else (own if own.is_file() else None),
                      overrides)
    if write:
        write_config(run_dir, cfg)
    return cfg


def _require(path: Path, stage: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `sigma-fast {stage}` on this run "
                                f"directory first")
    return path


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    return int(os.environ.get("RANK", "0"))


def _say(msg: str) -> None:
    """Print a progress line; under torchrun only rank 0 speaks."""
    if _rank() == 0:
        print(msg, flush=True)


# ------------------------------------------------------------------------------- stages
def _dataset(cfg):
    from .data import load_dataset

    d = cfg["data"]
    return load_dataset(d["dataset"], max_history=d["max_history"],
                        min_rating=d["min_rating"] or None)


def prepare(run_dir, cfg: dict) -> dict:
    """Load the dataset (cached), build the seven tasks' samples and save their statistics."""
    from .data import build_task_samples, task_statistics

    run_dir = Path(run_dir)
    t = time.perf_counter()
    ds = _dataset(cfg)
    out = run_dir / "data"
    summary = {"name": ds.name, "users": ds.num_users, "items": ds.num_items,
               "interactions": ds.num_interactions, "genres": len(ds.genre_names),
               "fingerprint": ds.fingerprint}
    atomic_write_json(out / "dataset.json", summary)
    stats = {}
    for split in ("train", "valid", "test"):
        samples = build_task_samples(ds, split, seed=cfg["data"]["seed"])
        stats[split] = task_statistics(samples, path=out / f"task_stats_{split}.json")
    _say(f"[prepare] {ds} in {time.perf_counter() - t:.1f} s")
    for split in ("train", "test"):
        per = stats[split]["tasks"]
        _say(f"  {split:5s} samples: " + ", ".join(f"{k} {v['samples']}" for k, v in per.items()))
    return summary


def ground(run_dir, cfg: dict, *, progress=None, id_embeddings=None) -> dict:
    """Text features → multi-view grounding (BPR teacher, L_CL + λ·L_KD) → agreement report.

    ``id_embeddings`` float [num_items, d]: a collaborative table to use as the teacher instead
    of training BPR (see :func:`~sigma_fast.rec.grounding.ground_dataset`)."""
    from .grounding import ground_dataset

    run_dir = Path(run_dir)
    g = cfg["grounding"]
    out = run_dir / "grounding"
    ds = _dataset(cfg)
    t = time.perf_counter()
    features = None
    if g["encoder"] == "hashed":
        from .grounding import hashed_text_features

        features = hashed_text_features(ds.item_texts)
    res = ground_dataset(ds, features, encoder=g["encoder"], train_layers=g["train_layers"],
                         dim=g["dim"], epochs=g["epochs"], tau=g["tau"], lam=g["lam"],
                         pairs_per_epoch=g["pairs_per_epoch"] or None,
                         id_dim=g["id_dim"], id_epochs=g["id_epochs"], seed=g["seed"],
                         id_embeddings=id_embeddings, progress=progress)
    feats = res.text_features if res.text_features is not None else features
    atomic_save_npy(out / "grounded.npy", res.grounded.astype(np.float32))
    atomic_save_npy(out / "id_embeddings.npy", res.id_embeddings.astype(np.float32))
    atomic_save_npy(out / "text_features.npy", feats.astype(np.float32))
    report = {"k": res.k, "recall": res.agreement}
    atomic_write_json(out / "agreement.json", report)
    _say(f"[ground] grounded in {time.perf_counter() - t:.1f} s; held-out co-interaction "
         f"recall@{res.k}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.agreement.items()))
    return report


def _tokenizer_name(variant: str) -> str:
    return {"sigma_l2": "grounded_l2", "no_grounding": "raw_l1"}.get(variant, "grounded_l1")


def tokenize(run_dir, cfg: dict, variants=None) -> dict:
    """Fit the hybrid item tokenizers the variants need (RQ of grounded or raw embeddings)."""
    from .tokenization import HybridItemTokenizer

    run_dir = Path(run_dir)
    gdir = _require(run_dir / "grounding" / "grounded.npy", "ground").parent
    tk = cfg["tokenizer"]
    names = sorted({_tokenizer_name(v) for v in (variants or cfg["train"]["variants"])})
    id_emb = load_npy(gdir / "id_embeddings.npy")
    reports = {}
    for name in names:
        source = "text_features" if name.startswith("raw") else "grounded"
        x = load_npy(gdir / f"{source}.npy")
        tok = HybridItemTokenizer(tk["num_levels"], tk["codebook_size"] or None,
                                  prefix_len=int(name[-1]), iters=tk["iters"])
        tok.fit(x, id_embeddings=id_emb, seed=tk["seed"])
        tok.save(run_dir / "tokenizer" / name)
        rep = tok.report()
        atomic_write_json(run_dir / "tokenizer" / name / "report.json", rep)
        reports[name] = rep
        b = rep["bucket_size"]
        _say(f"[tokenize] {name}: {rep['num_levels']} levels x {rep['codebook_size']} codes, "
             f"{rep['num_buckets']} prefix buckets (size median {b['median']:.0f}, "
             f"p10-p90 {b['p10']:.0f}-{b['p90']:.0f}), full-SID collision rate "
             f"{rep['collision_rate']:.3f}")
    return reports


def _variant_mode(variant: str) -> str:
    return {"gr_sid": "gr_sid", "gr_id": "gr_id"}.get(variant, "sigma")


def sigma_model(cfg: dict, items, variant: str = "sigma"):
    """A freshly initialised :class:`~sigma_fast.rec.model.SigmaModel` of ``variant`` as the
    config's ``model`` section describes it, over the item tokenizer ``items``."""
    from .model import SigmaModel

    m, tr = cfg["model"], cfg["train"]
    return SigmaModel.from_preset(m["backbone"], items, mode=_variant_mode(variant),
                                  num_layers=m["num_layers"] or None,
                                  hidden_size=m["hidden_size"], seed=tr["seed"],
                                  tau=m["tau"], nce_weight=m["nce_weight"],
                                  hard_negatives=m["hard_negatives"],
                                  negatives=m["negatives"],
                                  subset_negatives=m["subset_negatives"],
                                  subset_weight=m["subset_weight"],
                                  dense_weight=m["dense_weight"],
                                  trainable_ids=m["trainable_ids"],
                                  lora_rank=m["lora_rank"],
                                  lora_layers=m["lora_layers"] or None,
                                  max_history=cfg["data"]["max_history"])


def train_config(cfg: dict):
    """The config's ``train`` section as a :class:`~sigma_fast.rec.train.TrainConfig`."""
    from .train import TrainConfig

    return TrainConfig(**{k: v for k, v in cfg["train"].items() if k != "variants"})


def train(run_dir, cfg: dict, variants=None, *, progress=None) -> dict:
    """SFT of each variant's model on every task's training samples."""
    from .data import build_task_samples
    from .tokenization import HybridItemTokenizer
    from .train import train_sigma

    run_dir = Path(run_dir)
    m, tr = cfg["model"], cfg["train"]
    ds = _dataset(cfg)
    train_samples = build_task_samples(ds, "train", seed=cfg["data"]["seed"])
    valid = build_task_samples(ds, "valid", seed=cfg["data"]["seed"])
    rng = np.random.default_rng(tr["seed"])
    valid = [valid[i] for i in rng.permutation(len(valid))[: tr["eval_samples"]]]
    histories = {}
    for variant in (variants or tr["variants"]):
        if variant == "no_apf":
            _say("[train] no_apf uses the sigma model (it differs at generation only)")
            continue
        tok_dir = _require(run_dir / "tokenizer" / _tokenizer_name(variant), "tokenize")
        items = HybridItemTokenizer.load(tok_dir)
        model = sigma_model(cfg, items, variant)
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        _say(f"[train] {variant}: {m['backbone']} backbone, {n_params / 1e6:.1f} M parameters "
             f"({n_train / 1e6:.1f} M trained{', LoRA' if m['lora_rank'] else ''}), "
             f"{len(train_samples)} training samples over 7 tasks, {tr['steps']} steps of "
             f"{tr['batch_size']}")
        config = train_config(cfg)
        t = time.perf_counter()
        hist = train_sigma(model, train_samples, out_dir=run_dir / "train" / variant,
                           config=config, valid_samples=valid, progress=progress)
        if _rank() == 0:  # under torchrun every rank holds the same (synchronised) model
            model.save_pretrained(run_dir / "models" / variant)
            atomic_write_json(run_dir / "train" / variant / "history.json", hist)
        histories[variant] = hist
        _say(f"[train] {variant} done in {time.perf_counter() - t:.0f} s -> "
             f"{run_dir / 'models' / variant}")
    return histories


def _eval_samples(ds, cfg):
    from .data import build_task_samples, exclude_seen

    e = cfg["eval"]
    samples = build_task_samples(ds, e["split"], seed=cfg["data"]["seed"])
    if e["max_users"]:
        samples = [s for s in samples if s.user < e["max_users"]]
    return exclude_seen(samples, ds) if e["exclude_seen"] else samples


def _summary(name: str, res: dict, seconds: float, n: int) -> str:
    a = res["all"]
    return (f"[evaluate] {name}: HR@10 {a['HR@10']['mean']:.4f}, NDCG@10 "
            f"{a['NDCG@10']['mean']:.4f}; illegal items {a['illegal']}, duplicates "
            f"{a['duplicates']} ({seconds:.1f} s, {1e3 * seconds / max(n, 1):.1f} ms/request)")


def load_variant(run_dir, variant: str, device=None):
    """The trained model of ``variant`` (``no_apf`` is the sigma model), on ``device``."""
    from .model import SigmaModel

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected names from {VARIANTS}")
    name = "sigma" if variant == "no_apf" else variant
    return SigmaModel.from_pretrained(_require(Path(run_dir) / "models" / name, "train"),
                                      device=device)


def evaluate(run_dir, cfg: dict, variants=None, baselines=None, *, progress=None) -> dict:
    """Rank every evaluation sample with each variant and baseline, compute HR/NDCG with
    bootstrap CIs per task, and write results.json / results.md / PNGs to run/eval."""
    from .evaluation import evaluate_rankings, results_table, write_results
    from .generate import Recommender

    run_dir = Path(run_dir)
    e = cfg["eval"]
    ds = _dataset(cfg)
    samples = _eval_samples(ds, cfg)
    _say(f"[evaluate] {len(samples)} {e['split']} samples of "
         f"{len({s.user for s in samples})} users"
         + (" (items already consumed are not candidates)" if e["exclude_seen"] else ""))
    results, timing = {}, {}
    for name in (baselines if baselines is not None else e["baselines"]):
        t = time.perf_counter()
        ranks = _baseline_rankings(run_dir, cfg, ds, name, samples, progress)
        timing[name] = time.perf_counter() - t
        results[name] = evaluate_rankings(samples, ranks, bootstrap=e["bootstrap"])
        _say(_summary(name, results[name], timing[name], len(samples)))
    for variant in (variants if variants is not None else e["variants"]):
        model = load_variant(run_dir, variant)
        rec = Recommender(model, num_beams=e["num_beams"], top_m=e["top_m"],
                          adaptive=variant != "no_apf", batch_size=32)
        t = time.perf_counter()
        out = rec(samples, top_n=e["top_n"], progress=progress)
        timing[variant] = time.perf_counter() - t
        results[variant] = evaluate_rankings(samples, out.item_ids.numpy(),
                                             bootstrap=e["bootstrap"])
        _say(_summary(variant, results[variant], timing[variant], len(samples)))
    out_dir = run_dir / "eval"
    write_results(results, out_dir, title=f"{ds.name}, {e['split']} split")
    atomic_write_json(out_dir / "timing.json", timing)
    _say(results_table(results))
    return results


def sasrec_settings(cfg: dict, num_items: int) -> tuple[dict, dict]:
    """The SASRec baseline's (constructor arguments, ``fit`` arguments) from the config."""
    e = cfg["eval"]
    shape = dict(num_items=num_items, dim=e["sasrec_dim"], num_blocks=2,
                 num_heads=e["sasrec_heads"], max_len=cfg["data"]["max_history"], dropout=0.2,
                 normalize=e["sasrec_normalize"])
    fit = dict(epochs=e["sasrec_epochs"], lr=float(e["sasrec_lr"]), seed=cfg["train"]["seed"],
               loss=e["sasrec_loss"], num_negatives=e["sasrec_negatives"],
               temperature=float(e["sasrec_temperature"]))
    return shape, fit


def _baseline_rankings(run_dir, cfg, ds, name, samples, progress):
    from .baselines import MostPopular, SASRec

    top_n = cfg["eval"]["top_n"]
    if name == "most_popular":
        return MostPopular(ds).rank(samples, top_n=top_n)
    folder = Path(run_dir) / "baselines" / "sasrec"
    shape, fit = sasrec_settings(cfg, ds.num_items)
    model = None
    if folder.is_dir():
        try:
            model = SASRec.load(folder)
        except (FileNotFoundError, ValueError) as exc:
            _say(f"[evaluate] retraining SASRec: the saved one cannot be used ({exc})")
            model = None
    if model is not None:
        # the initialisation is a setting too: a model saved before it was recorded retrains
        expected = fit | {"item_init_std": model.item_init_std}
        if model.config() != shape or any(model.train_settings.get(k) != v
                                          for k, v in expected.items()):
            _say("[evaluate] retraining SASRec: the saved one was trained with other settings")
            model = None
    if model is None:
        model = SASRec(**shape)
        model.fit(ds, progress=progress, **fit)
        model.save(folder)
    return model.rank(samples, top_n=top_n)


# ------------------------------------------------------------------------------ recommend
def request_builder(cfg: dict, *, split: str = "test", limits=None, ds=None):
    """The run's :class:`~sigma_fast.rec.requests.RequestBuilder` (its dataset, its task seed)."""
    from .requests import RequestBuilder

    return RequestBuilder(ds if ds is not None else _dataset(cfg), split=split,
                          seed=cfg["data"]["seed"], limits=limits)


def recommend_items(run_dir, cfg: dict, *, user=None, history=None, task="JustForYou",
                    instruction=None, allowed=None, variant="sigma", top_n=10,
                    exclude_seen: bool = True, device=None) -> list[dict]:
    """Ranked ``{"id", "title", "score"}`` (raw item id, title, score) for one request built by
    :class:`~sigma_fast.rec.requests.RequestBuilder` (a dataset user or a history of titles /
    item ids, a task or a free-form ``instruction``, ``allowed`` raw item ids; with
    ``exclude_seen`` what the user has seen is never recommended)."""
    from .generate import Recommender

    rb = request_builder(cfg)
    top_n = rb.check_top_n(top_n)
    sample = rb.build(user=user, history=history, task=task, instruction=instruction,
                      allowed=allowed, exclude_seen=exclude_seen)
    e = cfg["eval"]
    rec = Recommender(load_variant(run_dir, variant, device), num_beams=e["num_beams"],
                      top_m=e["top_m"], adaptive=variant != "no_apf")
    out = rec([sample], top_n=top_n)
    ds = rb.ds
    return [{"id": ds.item_ids[i], "title": ds.item_titles[i], "score": float(s)}
            for i, s in zip(out.item_ids[0].tolist(), out.scores[0].tolist()) if i >= 0]


def recommend_for(run_dir, cfg: dict, *, user=None, history_titles=None, task="JustForYou",
                  instruction=None, variant="sigma", top_n=10, exclude_seen: bool = True
                  ) -> list[tuple[str, float]]:
    """Ranked (title, score) for a dataset user (their latest items as history) or a list of
    titles / item ids, under one of the seven tasks' instructions or a free-form
    ``instruction`` (see :func:`recommend_items`)."""
    recs = recommend_items(run_dir, cfg, user=user, history=history_titles, task=task,
                           instruction=instruction, variant=variant, top_n=top_n,
                           exclude_seen=exclude_seen)
    return [(r["title"], r["score"]) for r in recs]


# ---------------------------------------------------------------------------------- demo
def demo(run_dir, cfg: dict, *, progress=None) -> dict:
    """Everything on the configured dataset: prepare, ground, tokenize, train, evaluate, and a
    few recommendations with titles."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    write_config(run_dir, cfg)
    prepare(run_dir, cfg)
    ground(run_dir, cfg, progress=progress)
    variants = sorted(set(cfg["train"]["variants"]) | set(cfg["eval"]["variants"]) - {"no_apf"})
    tokenize(run_dir, cfg, variants)
    train(run_dir, cfg, variants, progress=progress)
    results = evaluate(run_dir, cfg, progress=progress)
    ds = _dataset(cfg)
    from .data import build_task_samples
    from .data.tasks import HISTORY_PLACEHOLDER

    _say("\n[recommend] sample recommendations (sigma; the user's history excluded):")
    test = build_task_samples(ds, "test", seed=cfg["data"]["seed"])
    for task in ("JustForYou", "Category", "Longtail", "Discover"):
        sample = next((x for x in test if x.task == task), None)
        if sample is None:
            continue
        user = ds.user_ids[sample.user]
        recs = recommend_for(run_dir, cfg, user=user, task=task, top_n=5)
        hist = [ds.item_titles[i] for i in ds.sequence(sample.user)[-3:]]
        instruction = sample.prompt.split(HISTORY_PLACEHOLDER)[-1].lstrip(". ")
        _say(f"  user {user}, {task}: \"{instruction}\"")
        _say(f"    recently: {'; '.join(hist)}")
        for title, score in recs:
            _say(f"      {score:8.3f}  {title}")
    _say(f"\n[demo] finished in {time.perf_counter() - t0:.0f} s; artifacts in {run_dir}")
    return results
