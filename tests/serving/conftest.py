"""A tiny trained run shared by the serving tests: the synthetic pattern catalogue, hashed text
features and a 32-wide two-layer backbone trained for a few steps (the answers need not be good,
only deterministic)."""

import json

import pytest

from sigma_fixtures import needs_minilm, write_pattern_dataset

SETTINGS = {
    "data.max_history": "6", "grounding.encoder": '"hashed"', "grounding.epochs": "2",
    "grounding.id_epochs": "2", "tokenizer.codebook_size": "6", "tokenizer.num_levels": "3",
    "tokenizer.iters": "5", "model.hidden_size": "32", "model.hard_negatives": "4",
    "train.steps": "4", "train.batch_size": "8", "train.eval_every": "0",
    "train.eval_samples": "10", "eval.num_beams": "3", "eval.top_m": "8",
}


def run_settings_args(data) -> list[str]:
    out = ["--set", f"data.dataset={json.dumps(str(data))}"]
    for key, value in SETTINGS.items():
        out += ["--set", f"{key}={value}"]
    return out + ["--quiet"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run directory with a trained ``sigma`` model (built once per session)."""
    if needs_minilm.args[0]:
        pytest.skip(needs_minilm.kwargs["reason"])
    from sigma_fast.apps.cli import main
    from sigma_fast.testing import torch_threads

    root = tmp_path_factory.mktemp("serving")
    data = write_pattern_dataset(root / "pat")
    run = root / "run"
    with torch_threads(1):
        for stage in ("prepare", "ground", "tokenize", "train"):
            args = [stage, "--run", str(run)] + (run_settings_args(data) if stage == "prepare"
                                                 else ["--quiet"] if stage != "tokenize"
                                                 else [])
            assert main(args) == 0, stage
    return run
