"""Adversarial run directories, saved artifacts and dataset files.

1. No file a run directory can hold runs code when loaded: a pickle whose ``__reduce__`` writes
   a marker file replaces, in turn, every file of a real run directory (and is planted beside
   them under the names loaders have used for pickles: trainer_state.pt, pytorch_model.bin,
   training_args.bin, *.pkl, *.npy of objects); every loader of that part of the run is called,
   and the marker must never appear. Files that loaders read must make them fail clearly.
2. Tampered artifacts (every JSON field of the model, tokenizer, trainer state, SASRec and
   grounding configs with wrong types and ranges, flipped bytes, swapped files) and malformed
   RecBole files each raise a clear exception naming the file (and field or line); these cases
   run in child processes (tests/adversarial.py).
"""

import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from adversarial import Case, run_batch
from sigma_fixtures import needs_minilm

pytestmark = [needs_minilm, pytest.mark.e2e]

MARKER_NAME = "PAYLOAD_RAN"


class _Payload:
    """Unpickling this object writes the marker file (what a real attack would do instead)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def _payload_bytes(marker: Path, name: str) -> bytes:
    """The payload in the format a loader of a file with this name might unpickle."""
    import io

    import torch

    buf = io.BytesIO()
    if name.endswith(".npy"):
        np.save(buf, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    elif name.endswith((".pt", ".bin", ".pth", ".ckpt")):
        torch.save({"state": _Payload(marker)}, buf)
    else:
        pickle.dump(_Payload(marker), buf)
    return buf.getvalue()


def _config(data: Path) -> dict:
    from sigma_fast.rec import pipeline

    return pipeline.load_config(None, {
        "data": {"dataset": str(data), "max_history": 8},
        "grounding": {"encoder": "hashed", "epochs": 1, "id_epochs": 1, "dim": 16,
                      "id_dim": 16},
        "tokenizer": {"num_levels": 2, "codebook_size": 8, "iters": 2},
        "model": {"hidden_size": 32, "hard_negatives": 2},
        "train": {"steps": 2, "batch_size": 4, "eval_every": 0, "save_every": 1,
                  "eval_samples": 4},
        "eval": {"max_users": 5, "bootstrap": 10, "sasrec_epochs": 1, "num_beams": 2,
                 "top_m": 5, "baselines": ["sasrec"], "variants": []},
    })


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A complete small run directory (every stage, plus a saved GroundingResult), built once;
    the dataset cache goes to a temporary folder."""
    import contextlib
    import io

    from sigma_fast.rec import pipeline
    from sigma_fast.rec.data import load_dataset
    from sigma_fast.rec.grounding import ground_dataset, hashed_text_features
    from sigma_fast.rec.synthetic import synthetic_dataset

    root = tmp_path_factory.mktemp("adv_run")
    old = os.environ.get("SIGMA_FAST_CACHE")
    os.environ["SIGMA_FAST_CACHE"] = str(root / "cache")
    try:
        data = root / "data"
        synthetic_dataset(data, num_items=80, num_users=40, min_length=6, max_length=10)
        run = root / "run"
        cfg = _config(data)
        with contextlib.redirect_stdout(io.StringIO()):
            pipeline.write_config(run, cfg)
            pipeline.prepare(run, cfg)
            pipeline.ground(run, cfg, progress=False)
            pipeline.tokenize(run, cfg, ["sigma"])
            pipeline.train(run, cfg, ["sigma"], progress=False)
            pipeline.evaluate(run, cfg, progress=False)
        ds = load_dataset(data, cache_dir=False)
        res = ground_dataset(ds, hashed_text_features(ds.item_texts, 32), dim=8, epochs=1,
                             id_dim=8, id_epochs=1, progress=False)
        res.save(run / "grounding_result")
        yield run, cfg
    finally:
        if old is None:
            os.environ.pop("SIGMA_FAST_CACHE", None)
        else:
            os.environ["SIGMA_FAST_CACHE"] = old


# Every loader of a part of a run directory (by the folder a file lies in).
def _loaders(cfg):
    from sigma_fast._io import load_npy
    from sigma_fast.rec import pipeline
    from sigma_fast.rec.baselines import SASRec
    from sigma_fast.rec.grounding import GroundingResult
    from sigma_fast.rec.model import SigmaModel
    from sigma_fast.rec.tokenization import HybridItemTokenizer

    def resume(run):
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            pipeline.train(run, cfg, ["sigma"], progress=False)

    return {
        "config.toml": [lambda run: pipeline.load_config(run / "config.toml")],
        "grounding": [lambda run: [load_npy(p) for p in sorted((run / "grounding").iterdir())]],
        "tokenizer": [lambda run: HybridItemTokenizer.load(run / "tokenizer" / "grounded_l1"),
                      resume],
        "train": [resume,
                  lambda run: SigmaModel.from_pretrained(run / "train" / "sigma" / "checkpoint"
                                                         / "model")],
        "models": [lambda run: SigmaModel.from_pretrained(run / "models" / "sigma")],
        "baselines": [lambda run: SASRec.load(run / "baselines" / "sasrec")],
        "grounding_result": [lambda run: GroundingResult.load(run / "grounding_result")],
    }


# Written for people or for the record, never read back by sigma_fast.
_NEVER_READ = {"report.json", "progress.json", "history.json", "dataset.json", "timing.json",
               "agreement.json", "results.json", "results.md"}


def _never_read(rel: Path) -> bool:
    return (rel.name in _NEVER_READ or rel.parts[0] in ("data", "eval")
            or rel.name.startswith("task_stats"))


def _attempt(loaders, run) -> list[str]:
    errors = []
    for load in loaders:
        try:
            load(run)
        except Exception as exc:  # noqa: BLE001 - every failure is fine, only code must not run
            errors.append(f"{type(exc).__name__}: {exc}")
    return errors


def test_no_file_of_a_run_directory_runs_code(run_dir, tmp_path):
    run, cfg = run_dir
    loaders = _loaders(cfg)
    files = sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file())
    assert len(files) > 40, files
    marker = tmp_path / MARKER_NAME
    read, silent = 0, []
    for rel in files:
        part = rel.parts[0]
        if part in ("data", "eval"):
            continue  # outputs only
        key = "config.toml" if rel.name == "config.toml" else part
        copy = tmp_path / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run, copy)
        (copy / rel).write_bytes(_payload_bytes(marker, rel.name))
        errors = _attempt(loaders[key], copy)
        assert not marker.exists(), f"loading a run with a payload in {rel} ran its code"
        if _never_read(rel):
            continue
        read += 1
        if not errors:
            silent.append(str(rel))
        assert all("Traceback" not in e for e in errors)
    assert not silent, f"files replaced by a pickle and loaded without an error: {silent}"
    assert read > 30


@pytest.mark.parametrize("where, name", [
    ("train/sigma/checkpoint", "trainer_state.pt"),
    ("train/sigma/checkpoint", "optimizer.pt"),
    ("train/sigma/checkpoint", "rng_state.pth"),
    ("models/sigma/backbone", "pytorch_model.bin"),
    ("models/sigma/backbone", "training_args.bin"),
    ("models/sigma/items", "tables.pkl"),
    ("train/sigma/checkpoint/model/backbone", "pytorch_model.bin"),
    ("tokenizer/grounded_l1", "codes.npy"),
    ("grounding", "extra.npy"),
    ("baselines/sasrec", "sasrec.pt"),
    ("grounding_result/tower", "body.bin"),
])
def test_planted_pickles_are_never_loaded(run_dir, tmp_path, where, name):
    run, cfg = run_dir
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    marker = tmp_path / MARKER_NAME
    (copy / where / name).write_bytes(_payload_bytes(marker, name))
    errors = _attempt(_loaders(cfg)[where.split("/")[0]], copy)
    assert not marker.exists(), f"a planted {where}/{name} ran its code"
    if where.startswith("models") and "backbone" in where:
        assert any("not part of the saved model" in e for e in errors), errors


def test_old_torch_save_checkpoint_is_refused(run_dir, tmp_path):
    run, cfg = run_dir
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    ckpt = copy / "train" / "sigma" / "checkpoint"
    for f in ("trainer_state.json", "trainer_state.safetensors"):
        (ckpt / f).unlink()
    marker = tmp_path / MARKER_NAME
    (ckpt / "trainer_state.pt").write_bytes(_payload_bytes(marker, "trainer_state.pt"))
    from sigma_fast.apps.cli import main

    code = main(["train", "--run", str(copy), "--quiet"])
    assert not marker.exists()
    assert code == 2


def test_old_torch_save_checkpoint_message(run_dir, tmp_path):
    run, cfg = run_dir
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    ckpt = copy / "train" / "sigma" / "checkpoint"
    (ckpt / "trainer_state.json").unlink()
    marker = tmp_path / MARKER_NAME
    (ckpt / "trainer_state.pt").write_bytes(_payload_bytes(marker, "trainer_state.pt"))
    with pytest.raises(ValueError, match=r"trainer_state.pt is a checkpoint in the old "
                                         r"torch.save format .* never loads.*delete .*checkpoint"):
        _loaders(cfg)["train"][0](copy)
    assert not marker.exists()


def test_foreign_model_folders_run_no_code(tmp_path):
    """A Hugging Face folder (a backbone or text-encoder path in a config) whose config asks
    for remote code and whose weights are a pickle: loading it runs none of it."""
    from sigma_fast.rec.grounding.text import load_lm
    from sigma_fast.rec.model import load_backbone

    marker = tmp_path / MARKER_NAME
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('code ran')\n")
    (evil / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 10,
        "auto_map": {"AutoConfig": "evil.Config", "AutoModel": "evil.Model",
                     "AutoModelForCausalLM": "evil.Model"}}))
    (evil / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["evil.Tokenizer", None]}}))
    (evil / "pytorch_model.bin").write_bytes(_payload_bytes(marker, "pytorch_model.bin"))
    for load in (lambda: load_backbone(str(evil)), lambda: load_lm(str(evil))):
        with pytest.raises(Exception):  # noqa: B017 - whatever transformers raises, no code runs
            load()
        assert not marker.exists()
    assert "evil" not in sys.modules


# ------------------------------------------------------------------ tampered artifacts (batch)

PRELUDE = r"""
import json, os, shutil, tempfile, warnings
from pathlib import Path
import numpy as np
import torch
RUN = Path(os.environ["ADV_RUN"])
TMP = Path(tempfile.mkdtemp())
from sigma_fast.rec.model import SigmaModel
from sigma_fast.rec.tokenization import HybridItemTokenizer
from sigma_fast.rec.baselines import SASRec
from sigma_fast.rec.grounding import GroundingResult, GroundingModel, TextTower
from sigma_fast.rec.data import load_dataset
from sigma_fast.rec.data.recbole import read_atomic_file
from sigma_fast.rec import pipeline
from sigma_fast.rec.train import TrainConfig, train_sigma
_n = [0]

def copy(rel):
    _n[0] += 1
    dst = TMP / f"c{_n[0]}" / rel
    shutil.copytree(RUN / rel, dst)
    return dst

def edit_json(path, **changes):
    c = json.loads(path.read_text())
    c.update(changes)
    path.write_text(json.dumps(c))

def set_nested(path, keys, value):
    c = json.loads(path.read_text())
    d = c
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value
    path.write_text(json.dumps(c))

def flip_byte(path, offset=-3):
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x01
    path.write_bytes(bytes(b))

def resume(ckpt_parent):
    items = HybridItemTokenizer.load(RUN / "tokenizer" / "grounded_l1")
    m = pipeline.load_config(RUN / "config.toml")["model"]  # the run's training options
    model = SigmaModel.from_preset("tiny", items, hidden_size=32, hard_negatives=2,
                                   max_history=8, tau=0.07, nce_weight=1.0,
                                   dense_weight=m["dense_weight"],
                                   trainable_ids=m["trainable_ids"])
    ds = load_dataset(RUN.parent / "data", cache_dir=False, max_history=8)
    from sigma_fast.rec.data import build_task_samples
    samples = build_task_samples(ds, "train")
    cfg = TrainConfig(steps=2, batch_size=4, eval_every=0, save_every=1, lr=2e-3)
    return train_sigma(model, samples, out_dir=ckpt_parent, config=cfg, progress=False)

def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path.parent
"""


def _json_cases(prefix, rel, config, load, fields):
    cases = []
    for field, values in fields.items():
        for i, value in enumerate(values):
            cases.append(Case(
                f"{prefix}_{field}_{i}",
                f"d = copy({rel!r})\n"
                f"edit_json(d / {config!r}, {field}=json.loads({json.dumps(json.dumps(value))}))\n"
                f"{load}(d)",
                "ValueError", rf"{config}: field '{field}' must be"))
    return cases


MODEL = _json_cases("model", "models/sigma", "sigma_model.json", "SigmaModel.from_pretrained", {
    "mode": ["SIGMA", 1, None], "backbone": [7], "tau": ["0.07", None, True],
    "nce_weight": [-1.0, "1"], "hard_negatives": [2.5, -1, False], "max_history": [0, "8"],
    "sid_levels": [0, 1.5], "extra": [[1]], "format_version": ["2", 0, 2.0],
}) + [
    Case("model_tau_zero",
         "d = copy('models/sigma'); edit_json(d / 'sigma_model.json', tau=0.0); "
         "SigmaModel.from_pretrained(d)", "ValueError", r"sigma_model.json: tau must be > 0"),
    Case("model_files_sha256_not_dict",
         "d = copy('models/sigma'); edit_json(d / 'sigma_model.json', files_sha256=[1]); "
         "SigmaModel.from_pretrained(d)", "ValueError", "field 'files_sha256' must be a JSON"),
    Case("model_files_sha256_missing",
         "d = copy('models/sigma'); c = json.loads((d / 'sigma_model.json').read_text()); "
         "del c['files_sha256']; (d / 'sigma_model.json').write_text(json.dumps(c)); "
         "SigmaModel.from_pretrained(d)", "ValueError", "missing field 'files_sha256'"),
    Case("model_flipped_weight_byte",
         "d = copy('models/sigma'); flip_byte(d / 'backbone' / 'model.safetensors'); "
         "SigmaModel.from_pretrained(d)", "ValueError",
         "backbone/model.safetensors: checksum mismatch"),
    Case("model_flipped_heads_byte",
         "d = copy('models/sigma'); flip_byte(d / 'heads.safetensors'); "
         "SigmaModel.from_pretrained(d)", "ValueError", "heads.safetensors: checksum mismatch"),
    Case("model_edited_tokenizer_json", """
        d = copy("models/sigma")
        t = d / "backbone" / "tokenizer.json"
        t.write_text(t.read_text().replace('"[UNK]"', '"[UNK2]"', 1))
        SigmaModel.from_pretrained(d)
        """, "ValueError", "tokenizer.json: checksum mismatch"),
    Case("model_heads_of_another_model", """
        d = copy("models/sigma")
        m = SigmaModel.from_pretrained(d)
        with torch.no_grad():
            m.query_head.weight.mul_(2)
        other = TMP / "other"
        m.save_pretrained(other)
        shutil.copy(other / "heads.safetensors", d / "heads.safetensors")
        SigmaModel.from_pretrained(d)
        """, "ValueError", "heads.safetensors: checksum mismatch"),
    Case("model_round_trip_is_exact", """
        a = SigmaModel.from_pretrained(RUN / "models" / "sigma")
        a.save_pretrained(TMP / "again")
        b = SigmaModel.from_pretrained(TMP / "again")
        for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), k
        """),
]

TOKENIZER = _json_cases(
    "tok", "tokenizer/grounded_l1", "hybrid_tokenizer.json", "HybridItemTokenizer.load", {
        "num_levels": ["2", 0, 2.0], "codebook_size": [None, 8.5], "prefix_len": [0, True],
        "beam_width": [1.5], "iters": [-1], "num_items": ["80"], "tables": [[], "text", [1]],
        "proj_fuse": [[1]], "token_ids": [5], "query_token": ["<x>"],
    }) + [
    Case("tok_prefix_len_above_levels",
         "d = copy('tokenizer/grounded_l1'); edit_json(d / 'hybrid_tokenizer.json', "
         "prefix_len=3); HybridItemTokenizer.load(d)", "ValueError",
         r"hybrid_tokenizer.json: prefix_len must be in \[1, num_levels = 2\]; got 3"),
    Case("tok_num_items_mismatch",
         "d = copy('tokenizer/grounded_l1'); edit_json(d / 'hybrid_tokenizer.json', "
         "num_items=81); HybridItemTokenizer.load(d)", "ValueError",
         r"codes torch.int64 \[80, 2\] .* do not match the config \(81 items"),
    Case("tok_flipped_tables_byte",
         "d = copy('tokenizer/grounded_l1'); flip_byte(d / 'item_tables.safetensors'); "
         "HybridItemTokenizer.load(d)", "ValueError",
         "item_tables.safetensors: checksum mismatch"),
    Case("tok_flipped_rq_byte",
         "d = copy('tokenizer/grounded_l1'); flip_byte(d / 'rq' / 'codebooks.safetensors'); "
         "HybridItemTokenizer.load(d)", "ValueError", "codebooks.safetensors: checksum mismatch"),
    Case("tok_rq_beam_width_float",
         "d = copy('tokenizer/grounded_l1'); edit_json(d / 'rq' / 'rq_config.json', "
         "beam_width=2.7); HybridItemTokenizer.load(d)", "ValueError",
         "rq_config.json: field 'beam_width' must be an int >= 1; got 2.7"),
    Case("tok_proj_fuse_dims", """
        d = copy("models/sigma/items")
        set_nested(d / "hybrid_tokenizer.json", ["proj_fuse", "hidden_size"], "32")
        HybridItemTokenizer.load(d)
        """, "ValueError", r"field 'proj_fuse'\): field 'hidden_size' must be an int"),
    Case("tok_proj_fuse_input_dims_wrong", """
        d = copy("models/sigma/items")
        set_nested(d / "hybrid_tokenizer.json", ["proj_fuse", "input_dims"], [3, 3])
        HybridItemTokenizer.load(d)
        """, "ValueError", "input_dims .* must be the widths of the tables"),
    Case("tok_token_ids_sid_not_ints", """
        d = copy("models/sigma/items")
        set_nested(d / "hybrid_tokenizer.json", ["token_ids", "sid"], [["a"]])
        HybridItemTokenizer.load(d)
        """, "ValueError", r"sid\[0\] must be a list of token ids"),
    Case("tok_format_1_loads_with_warning", """
        d = copy("tokenizer/grounded_l1")
        c = json.loads((d / "hybrid_tokenizer.json").read_text())
        del c["files_sha256"]
        c["format_version"] = 1
        (d / "hybrid_tokenizer.json").write_text(json.dumps(c))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            tok = HybridItemTokenizer.load(d)
        assert any("records no checksums" in str(x.message) for x in w)
        assert tok.num_items == 80
        """),
]

CKPT = "train/sigma"
STATE = "checkpoint/trainer_state.json"
TRAINER = [
    Case(f"trainer_{field}_{i}",
         f"d = copy({CKPT!r}); edit_json(d / {STATE!r}, "
         f"{field}=json.loads({json.dumps(json.dumps(v))})); resume(d)",
         "ValueError", rf"trainer_state.json: field '{field}' must be")
    for field, vals in {"step": ["2", -1, 1.5, None], "history": [{}], "config": [[]],
                        "scheduler": [None], "optimizer": ["adam"],
                        "tensors_sha256": ["0" * 63], "format_version": ["1"]}.items()
    for i, v in enumerate(vals)
] + [
    Case("trainer_step_beyond_steps",
         f"d = copy({CKPT!r}); edit_json(d / {STATE!r}, step=10**12); resume(d)", "ValueError",
         r"field 'step' must be in \[0, 2\]; got 1000000000000"),
    Case("trainer_flipped_tensor_byte",
         f"d = copy({CKPT!r}); flip_byte(d / 'checkpoint' / 'trainer_state.safetensors'); "
         f"resume(d)", "ValueError", "trainer_state.safetensors: checksum mismatch"),
    Case("trainer_other_schedule",
         f"d = copy({CKPT!r}); set_nested(d / {STATE!r}, ['config', 'steps'], 5); resume(d)",
         "ValueError", "the checkpoint was made with steps=5"),
    Case("trainer_optimizer_groups_edited",
         f"d = copy({CKPT!r}); set_nested(d / {STATE!r}, ['optimizer', 'param_groups'], []); "
         f"resume(d)", "ValueError", "field 'optimizer' does not describe this model's optimizer"),
    Case("trainer_scheduler_garbage",
         f"d = copy({CKPT!r}); edit_json(d / {STATE!r}, scheduler={{'base_lrs': 'x'}}); "
         f"resume(d)", "ValueError", "malformed field 'scheduler'|trainer_state"),
    Case("trainer_optimizer_tensor_reshaped", """
        from safetensors.torch import load_file, save_file
        from sigma_fast._io import sha256_file
        d = copy("train/sigma")
        f = d / "checkpoint" / "trainer_state.safetensors"
        t = load_file(f)
        key = next(k for k in t if k.endswith(".exp_avg"))
        t[key] = torch.zeros(3, 3)
        save_file(t, f)
        edit_json(d / "checkpoint" / "trainer_state.json", tensors_sha256=sha256_file(f))
        resume(d)
        """, "ValueError", r"exp_avg' must have the shape of parameter"),
    Case("trainer_rng_state_missing", """
        from safetensors.torch import load_file, save_file
        from sigma_fast._io import sha256_file
        d = copy("train/sigma")
        f = d / "checkpoint" / "trainer_state.safetensors"
        t = load_file(f)
        del t["rng.cpu"]
        save_file(t, f)
        edit_json(d / "checkpoint" / "trainer_state.json", tensors_sha256=sha256_file(f))
        resume(d)
        """, "ValueError", "expected tensor 'rng.cpu'"),
    Case("trainer_resume_is_a_no_op_when_done", """
        d = copy("train/sigma")
        hist = resume(d)
        assert json.loads((d / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
        """),
]

BASELINES = _json_cases("sasrec", "baselines/sasrec", "sasrec_config.json", "SASRec.load", {
    "num_items": ["80", 0], "dim": [1.5], "num_blocks": [None], "num_heads": [True],
    "max_len": [0], "dropout": [1.5, "0.2", None],
}) + [
    Case("sasrec_flipped_byte",
         "d = copy('baselines/sasrec'); flip_byte(d / 'sasrec.safetensors'); SASRec.load(d)",
         "ValueError", "checksum mismatch"),
] + _json_cases("ground", "grounding_result", "grounding_result.json", "GroundingResult.load", {
    "k": ["20", 0], "agreement": [[0.1]],
}) + _json_cases("tower", "grounding_result/tower", "tower_config.json", "TextTower.load", {
    "mode": ["frozen2", None], "pooling": ["max"], "max_length": [0, "128"],
}) + _json_cases("head", "grounding_result/tower/head", "grounding_config.json",
                 "GroundingModel.load", {"in_dim": ["32", 0], "dim": [8.0], "hidden": [0]}) + [
    Case("ground_flipped_embeddings",
         "d = copy('grounding_result'); flip_byte(d / 'embeddings.safetensors'); "
         "GroundingResult.load(d)", "ValueError", "checksum mismatch"),
    Case("pipeline_grounding_npy_of_objects", """
        d = copy("grounding")
        np.save(d / "grounded.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
        from sigma_fast._io import load_npy
        load_npy(d / "grounded.npy")
        """, "ValueError", "grounded.npy is not a plain NumPy array file"),
    Case("pipeline_config_not_utf8",
         "d = copy('.'); (d / 'config.toml').write_bytes(b'\\xff\\xfe[train]'); "
         "pipeline.load_config(d / 'config.toml')", "ValueError",
         r"config.toml is not a TOML file: byte 0 is not valid UTF-8"),
    Case("pipeline_config_wrong_type",
         "d = copy('.'); (d / 'config.toml').write_text('[train]\\nsteps = \"3\"\\n'); "
         "pipeline.load_config(d / 'config.toml')", "ValueError",
         r"config.toml: setting 'train.steps' must be int; got '3'"),
]

HEADER = "user_id:token\titem_id:token\ttimestamp:float\n"
DATASETS = [
    Case("data_non_utf8_id", f"""
        d = write(TMP / "nu" / "x.inter",
                  {HEADER!r}.encode() + b"u1\\ti1\\t1\\nu\\xff2\\ti2\\t2\\n")
        load_dataset(d, cache_dir=False)
        """, "ValueError", r"x.inter:3: not valid UTF-8"),
    Case("data_non_utf8_ids_would_merge", f"""
        # two users differing only in an invalid byte must not become one user
        d = write(TMP / "nu2" / "x.inter",
                  {HEADER!r}.encode() + b"u\\xff\\ti1\\t1\\nu\\xfe\\ti2\\t2\\n")
        load_dataset(d, cache_dir=False)
        """, "ValueError", r"x.inter:2: not valid UTF-8"),
    Case("data_non_utf8_header",
         "d = write(TMP / 'nh' / 'x.inter', b'user_id:tok\\xe9n\\n'); load_dataset(d, "
         "cache_dir=False)", "ValueError", r"x.inter:1: not valid UTF-8"),
    Case("data_non_utf8_item_file", f"""
        d = write(TMP / "ni" / "x.inter", {HEADER!r} + "u1\\ti1\\t1\\n")
        write(d / "x.item", b"item_id:token\\ttitle:token_seq\\ni1\\tCaf\\xe9\\n")
        load_dataset(d, cache_dir=False)
        """, "ValueError", r"x.item:2: not valid UTF-8"),
    Case("data_utf8_bom_is_fine", f"""
        d = write(TMP / "bom" / "x.inter", b"\\xef\\xbb\\xbf" + {HEADER!r}.encode()
                  + b"u1\\ti1\\t1\\nu1\\ti2\\t2\\n")
        ds = load_dataset(d, cache_dir=False)
        assert ds.user_ids == ["u1"] and ds.num_items == 2
        """),
    Case("data_header_only",
         f"d = write(TMP / 'ho' / 'x.inter', {HEADER!r}); load_dataset(d, cache_dir=False)",
         "ValueError", r"x.inter: no interactions \(the file has a header and no rows\)"),
    Case("data_header_only_blank_lines",
         f"d = write(TMP / 'hb' / 'x.inter', {HEADER!r} + '\\n\\n'); "
         f"load_dataset(d, cache_dir=False)", "ValueError", "no interactions"),
    Case("data_empty_file",
         "d = write(TMP / 'ef' / 'x.inter', ''); load_dataset(d, cache_dir=False)",
         "ValueError", "x.inter:1: empty header"),
    Case("data_filtered_to_nothing", """
        d = write(TMP / "fr" / "x.inter",
                  "user_id:token\\titem_id:token\\trating:float\\nu1\\ti1\\t1\\nu2\\ti1\\t2\\n")
        load_dataset(d, cache_dir=False, min_rating=4)
        """, "ValueError", r"none of its 2 interactions has rating >= min_rating = 4"),
    Case("data_prepare_empty_dataset", f"""
        d = write(TMP / "pe" / "x.inter", {HEADER!r})
        cfg = pipeline.load_config(None, {{"data": {{"dataset": str(d)}}}})
        pipeline.prepare(TMP / "pe_run", cfg)
        """, "ValueError", "no interactions"),
    Case("data_token_seq_title_is_text", f"""
        d = write(TMP / "ts" / "x.inter", {HEADER!r} + "u1\\ti1\\t1\\nu1\\ti2\\t2\\n")
        write(d / "x.item", "item_id:token\\tmovie_title:token_seq\\tclass:token_seq\\n"
                            "i1\\tToy  Story\\tAnimation Comedy\\ni2\\tHeat\\tCrime\\n")
        ds = load_dataset(d, cache_dir=False)
        assert ds.item_titles == ["Toy Story", "Heat"], ds.item_titles
        assert ds.item_genres[0] == ["Animation", "Comedy"], ds.item_genres
        assert ds.item_texts[0] == "Toy Story. class: Animation, Comedy", ds.item_texts[0]
        assert "[" not in ds.item_texts[0]
        t = read_atomic_file(d / "x.item")
        assert t.columns["movie_title"] == ["Toy Story", "Heat"]
        assert t.columns["class"][0] == ["Animation", "Comedy"]
        """),
    Case("data_token_seq_description_is_text", f"""
        d = write(TMP / "td" / "x.inter", {HEADER!r} + "u1\\ti1\\t1\\n")
        write(d / "x.item", "item_id:token\\ttitle:token\\tdescription:token_seq\\t"
                            "tags:token_seq\\ni1\\tHeat\\tA heist   film\\tnoir crime\\n")
        ds = load_dataset(d, cache_dir=False)
        assert ds.item_texts[0] == "Heat. description: A heist film. tags: noir, crime", \\
            ds.item_texts[0]
        """),
    Case("data_cache_round_trip_keeps_field_order", f"""
        d = write(TMP / "co" / "x.inter", {HEADER!r} + "u1\\ti1\\t1\\nu1\\ti2\\t2\\n")
        write(d / "x.user", "user_id:token\\tzip:token\\tage:token\\nu1\\t555\\t30\\n")
        first = load_dataset(d, cache_dir=TMP / "cache_co")
        again = load_dataset(d, cache_dir=TMP / "cache_co")
        assert list(first.user_profiles[0]) == ["zip", "age"]
        assert list(again.user_profiles[0]) == ["zip", "age"], again.user_profiles
        """),
    Case("data_cache_tampered_is_rebuilt", f"""
        d = write(TMP / "ct" / "x.inter", {HEADER!r} + "u1\\ti1\\t1\\nu1\\ti2\\t2\\n")
        load_dataset(d, cache_dir=TMP / "cache_ct")
        npz = next((TMP / "cache_ct").rglob("arrays.npz"))
        flip_byte(npz, 60)
        ds = load_dataset(d, cache_dir=TMP / "cache_ct")
        assert list(ds.seq_items) == [0, 1]
        """),
    Case("data_bad_float",
         f"d = write(TMP / 'bf' / 'x.inter', {HEADER!r} + 'u1\\ti1\\tsoon\\n'); "
         f"load_dataset(d, cache_dir=False)", "ValueError",
         r"x.inter:2: field 'timestamp' \(float\) has malformed value 'soon'"),
    Case("data_wrong_field_count",
         f"d = write(TMP / 'fc' / 'x.inter', {HEADER!r} + 'u1\\ti1\\n'); "
         f"load_dataset(d, cache_dir=False)", "ValueError",
         r"x.inter:2: expected 3 tab-separated fields; got 2"),
    Case("cli_run_is_a_file", """
        from sigma_fast.apps.cli import main
        import contextlib, io
        f = TMP / "a_file"
        f.write_text("x")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(["prepare", "--run", str(f)]) == 2
        assert "is a file; expected a run directory" in err.getvalue(), err.getvalue()
        """),
    Case("cli_config_not_utf8", """
        from sigma_fast.apps.cli import main
        import contextlib, io
        f = TMP / "bad.toml"
        f.write_bytes(b"[data]\\nname = '\\xff'\\n")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(["prepare", "--run", str(TMP / "r"), "--config", str(f)]) == 2
        assert "bad.toml is not a TOML file: byte 15 is not valid UTF-8" in err.getvalue(), \\
            err.getvalue()
        """),
]

GROUPS = {"model": MODEL, "tokenizer": TOKENIZER, "trainer_state": TRAINER,
          "baselines_grounding_config": BASELINES, "datasets": DATASETS}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_adversarial_artifacts(group, run_dir, tmp_path):
    run, _ = run_dir
    failures = run_batch(GROUPS[group], PRELUDE, tmp_path, env={"ADV_RUN": str(run)})
    assert not failures, f"{len(failures)} of {len(GROUPS[group])} cases failed:\n\n" + \
        "\n\n".join(failures)
