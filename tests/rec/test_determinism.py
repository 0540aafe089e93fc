"""Training is bit-reproducible: the same seed gives the same weights, bit for bit, in one
process and in two separate ones (different hash seeds). Without deterministic kernels torch's
multithreaded CPU index_put_(accumulate=True) made the BPR teacher differ from call to call and
SFT with many hard negatives differ from run to run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sigma_fixtures import needs_minilm


def _interactions(tmp_path):
    from sigma_fast.rec.grounding.ground import training_interactions
    from sigma_fast.rec.synthetic import synthetic_dataset

    ds = synthetic_dataset(tmp_path / "syn", num_items=400, num_users=150, min_length=8,
                           max_length=25)
    return ds, training_interactions(ds)


def test_bpr_is_bit_reproducible(tmp_path):
    from sigma_fast.rec.grounding.teacher import train_bpr

    ds, (users, items, _) = _interactions(tmp_path)
    runs = [train_bpr(users, items, num_users=ds.num_users, num_items=ds.num_items, dim=64,
                      epochs=2, seed=0, progress=False) for _ in range(5)]
    for other in runs[1:]:
        assert np.array_equal(runs[0], other)
    assert not torch.are_deterministic_algorithms_enabled()  # restored afterwards


SFT_SCRIPT = r"""
import hashlib, json, sys
from pathlib import Path
import numpy as np, torch
from sigma_fast.rec.synthetic import synthetic_dataset
from sigma_fast.rec.data import build_task_samples
from sigma_fast.rec.grounding import hashed_text_features
from sigma_fast.rec import HybridItemTokenizer
from sigma_fast.rec.model import SigmaModel
from sigma_fast.rec.train import TrainConfig, train_sigma
out = Path(sys.argv[1])
ds = synthetic_dataset(out / "syn", num_items=300, num_users=120, min_length=8, max_length=20)
feats = hashed_text_features(ds.item_texts, 64)
id_emb = np.random.default_rng(0).standard_normal((ds.num_items, 16)).astype(np.float32)
items = HybridItemTokenizer(num_levels=3, codebook_size=8, iters=5).fit(
    feats, id_embeddings=id_emb, seed=0)
model = SigmaModel.from_preset("tiny", items, hidden_size=128, hard_negatives=16,
                               max_history=10)
train_sigma(model, build_task_samples(ds, "train"), out_dir=out / "run", progress=False,
            config=TrainConfig(steps=int(sys.argv[2]), batch_size=32, eval_every=0,
                               save_every=0))
print(json.dumps({k: hashlib.sha256(v.numpy().tobytes()).hexdigest()
                  for k, v in model.state_dict().items()}))
"""


@needs_minilm
@pytest.mark.e2e
def test_sft_runs_in_separate_processes_give_identical_weights(tmp_path):
    script = tmp_path / "sft.py"
    script.write_text(SFT_SCRIPT)
    digests = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, str(script), str(tmp_path / f"r{seed}"), "20"],
                             env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        digests.append(json.loads(out.stdout.strip().splitlines()[-1]))
    differ = [k for k in digests[0] if digests[0][k] != digests[1][k]]
    assert not differ, f"weights differ between two runs of the same seed: {differ[:5]}"
