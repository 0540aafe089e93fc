"""The experiment scripts that change or measure a run: scripts/sasrec_teacher.py and
scripts/training_flops.py, on a small run of the pattern catalogue."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from sigma_fixtures import needs_minilm, small_run_settings, write_pattern_dataset

from sigma_fast.apps.cli import main

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def grounded_run(tmp_path):
    """A run prepared, grounded and tokenized (hashed text features)."""
    sets = small_run_settings(write_pattern_dataset(tmp_path / "pat"))
    run = tmp_path / "run"
    for command in ("prepare", "ground", "tokenize"):
        assert main([command, "--run", str(run), *sets]) == 0
    return run


@needs_minilm
def test_sasrec_teacher_replaces_the_id_table_and_regrounds(grounded_run, capsys):
    from sigma_fast.rec.baselines import SASRec

    run, script = grounded_run, _script("sasrec_teacher")
    with pytest.raises(SystemExit, match="no trained SASRec"):
        script.main([str(run)])
    assert main(["evaluate", "--run", str(run), "--variants", "--baselines", "sasrec",
                 "--quiet"]) == 0
    gdir = run / "grounding"
    bpr = np.load(gdir / "id_embeddings.npy")
    grounded = np.load(gdir / "grounded.npy")
    table = SASRec.load(run / "baselines" / "sasrec").item_emb.weight[1:].detach().numpy()
    assert script.main([str(run)]) == 0
    np.testing.assert_array_equal(np.load(gdir / "id_embeddings.npy"), table)
    np.testing.assert_array_equal(np.load(gdir / "id_embeddings.bpr.npy"), bpr)
    np.testing.assert_array_equal(np.load(gdir / "grounded.npy"), grounded)  # untouched
    # again, with re-grounding: the backup still holds BPR's table, not the SASRec one
    assert script.main([str(run), "--reground"]) == 0
    np.testing.assert_array_equal(np.load(gdir / "id_embeddings.bpr.npy"), bpr)
    np.testing.assert_allclose(np.load(gdir / "id_embeddings.npy"), table)
    assert not np.allclose(np.load(gdir / "grounded.npy"), grounded)
    assert "re-grounded" in capsys.readouterr().out
    assert main(["tokenize", "--run", str(run), "--quiet"]) == 0


@needs_minilm
def test_training_flops_counts_both_trainings(grounded_run, capsys):
    run, script = grounded_run, _script("training_flops")
    assert script.main([str(run), "--batches", "2"]) == 0
    report = json.loads((run / "eval" / "training_flops.json").read_text())
    sigma, sasrec = report["sigma"], report["sasrec"]
    assert sigma["steps"] == 6 and sigma["flops"] == pytest.approx(6 * sigma["flops_per_step"])
    assert sasrec["flops"] == sasrec["epochs"] * (sasrec["steps_per_epoch"]
                                                  * sasrec["flops_per_step"]
                                                  + sasrec["flops_per_validation"])
    assert report["ratio"] == pytest.approx(sigma["flops"] / sasrec["flops"])
    assert report["matmul_flops_per_s"] > 0
    # twice the samples per step: about twice the FLOPs (padded lengths differ between draws);
    # the what-if leaves the run's own settings alone
    config = (run / "config.toml").read_text()
    assert script.main([str(run), "--batches", "2", "--set", "train.batch_size=16"]) == 0
    double = json.loads((run / "eval" / "training_flops.json").read_text())["sigma"]
    assert 1.5 < double["flops_per_step"] / sigma["flops_per_step"] < 2.7
    assert (run / "config.toml").read_text() == config
    assert "step_ms" not in sigma
    assert script.main([str(run), "--batches", "1", "--time-steps", "2", "--profile"]) == 0
    assert "aten::mm" in capsys.readouterr().out
    timed = json.loads((run / "eval" / "training_flops.json").read_text())["sigma"]
    assert set(timed["step_ms"]) == set(script.PHASES)
    assert all(v > 0 for v in timed["step_ms"].values())
    assert timed["attained_flops_per_s"] == pytest.approx(
        timed["flops_per_step"] / (sum(timed["step_ms"].values()) / 1e3))
    with pytest.raises(SystemExit, match="--batches must be at least 1"):
        script.main([str(run), "--batches", "0"])
    with pytest.raises(SystemExit, match="--time-steps must be 0 or more"):
        script.main([str(run), "--time-steps", "-1"])
