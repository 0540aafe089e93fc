"""SFT: the loss falls and the model learns the pattern; resumed training equals an
uninterrupted run; two CPU processes under DDP stay in sync; checkpoints are atomic."""

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

from sigma_fixtures import needs_minilm, pattern_setup

pytestmark = [needs_minilm, pytest.mark.e2e]


def _fresh(tmp_path, **kw):
    from sigma_fast.rec.data import build_task_samples
    from sigma_fast.rec.model import SigmaModel

    ds, items = pattern_setup(tmp_path)
    model = SigmaModel.from_preset("tiny", items, hidden_size=32, hard_negatives=4,
                                   max_history=6, **kw)
    return ds, model, build_task_samples(ds, "train", tasks=["JustForYou"]), \
        build_task_samples(ds, "valid", tasks=["JustForYou"])


def test_training_learns_the_pattern(tmp_path):
    from sigma_fast.rec.train import TrainConfig, hit_rate, train_sigma

    ds, model, train, valid = _fresh(tmp_path)
    before = hit_rate(model, valid, k=10, num_beams=4, top_m=20)
    hist = train_sigma(model, train, out_dir=tmp_path / "run", valid_samples=valid,
                       config=TrainConfig(steps=150, batch_size=32, lr=3e-3, eval_every=75,
                                          save_every=0), progress=False,
                       eval_options={"num_beams": 4, "top_m": 20})
    assert [h["step"] for h in hist] == [75, 150]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[-1]["hr@10"] > max(before, 0.5), (before, hist)
    assert (tmp_path / "run" / "checkpoint" / "model" / "sigma_model.json").is_file()


def test_resume_equals_uninterrupted(tmp_path):
    from sigma_fast.rec.train import TrainConfig, train_sigma

    cfg = TrainConfig(steps=4, batch_size=8, grad_accum=2, eval_every=0, save_every=2)
    _, m1, train, _ = _fresh(tmp_path / "a")
    train_sigma(m1, train, out_dir=tmp_path / "a" / "run", config=cfg, progress=False)

    _, m2, train2, _ = _fresh(tmp_path / "b")
    half = TrainConfig(**{**cfg.__dict__, "save_every": 2})
    # stop after 2 steps: run to step 2 by interrupting through a failing sample
    class Stop(Exception):
        pass

    calls = {"n": 0}
    encode = m2.encode

    def flaky(s, **kw):
        calls["n"] += 1
        if calls["n"] > 2 * 8:      # 2 steps of 8 samples
            raise Stop()
        return encode(s, **kw)

    m2.encode = flaky
    with pytest.raises(Stop):
        train_sigma(m2, train2, out_dir=tmp_path / "b" / "run", config=half, progress=False)
    m2.encode = encode
    state = json.loads((tmp_path / "b" / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2
    _, m3, train3, _ = _fresh(tmp_path / "c")   # a new process would start from scratch
    train_sigma(m3, train3, out_dir=tmp_path / "b" / "run", config=cfg, progress=False)
    for (k, a), (_, b) in zip(m1.state_dict().items(), m3.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


def test_resume_rejects_a_different_schedule(tmp_path):
    from sigma_fast.rec.train import TrainConfig, train_sigma

    _, m, train, _ = _fresh(tmp_path)
    train_sigma(m, train, out_dir=tmp_path / "run", progress=False,
                config=TrainConfig(steps=1, batch_size=4, eval_every=0))
    with pytest.raises(ValueError, match="steps=1"):
        train_sigma(m, train, out_dir=tmp_path / "run", progress=False,
                    config=TrainConfig(steps=2, batch_size=4, eval_every=0))


def test_bad_train_config():
    from sigma_fast.rec.train import TrainConfig

    with pytest.raises(ValueError, match="divisible"):
        TrainConfig(batch_size=6, grad_accum=4).check()
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0).check()


DDP_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from sigma_fixtures import pattern_setup
from pathlib import Path
from sigma_fast.rec.data import build_task_samples
from sigma_fast.rec.model import SigmaModel
from sigma_fast.rec.train import TrainConfig, train_sigma
import os
rank = int(os.environ["RANK"])
tmp = Path(sys.argv[2])
ds, items = pattern_setup(tmp / f"data{rank}")
model = SigmaModel.from_preset("tiny", items, hidden_size=32, hard_negatives=4, max_history=6)
train = build_task_samples(ds, "train", tasks=["JustForYou"])
train_sigma(model, train, out_dir=tmp / "run", progress=False,
            config=TrainConfig(steps=3, batch_size=4, eval_every=0, save_every=0))
torch.save({k: v for k, v in model.state_dict().items()}, tmp / f"rank{rank}.pt")
"""


def test_ddp_two_cpu_processes(tmp_path):
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    procs = []
    here = str(Path(__file__).parents[1])  # tests/, where sigma_fixtures lives
    for rank in range(2):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), here, str(tmp_path)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    a = torch.load(tmp_path / "rank0.pt")
    b = torch.load(tmp_path / "rank1.pt")
    init = _fresh(tmp_path / "init")[1].state_dict()
    changed = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)   # gradients were averaged
        changed += not torch.equal(a[k], init[k])
    assert changed > 0
    assert (tmp_path / "run" / "checkpoint" / "trainer_state.json").is_file()   # rank 0 saved


def test_resume_rejects_a_checkpoint_of_another_model(tmp_path):
    from sigma_fast.rec.train import TrainConfig, train_sigma

    _, m, train, _ = _fresh(tmp_path / "a")
    cfg = TrainConfig(steps=1, batch_size=4, eval_every=0)
    train_sigma(m, train, out_dir=tmp_path / "run", progress=False, config=cfg)
    _, other, _, _ = _fresh(tmp_path / "b", mode="gr_sid")   # a larger vocabulary
    with pytest.raises(ValueError, match="does not match this model"):
        train_sigma(other, train, out_dir=tmp_path / "run", progress=False, config=cfg)


@pytest.mark.parametrize("device, backend", [("cpu", "gloo"), ("cuda", "nccl")])
def test_process_group_backend_follows_the_model_device(monkeypatch, device, backend):
    """A CPU model joins a gloo group even where a GPU exists (NCCL cannot carry CPU tensors)."""
    import torch.distributed as dist

    from sigma_fast.rec import train as train_mod

    chosen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda b, **kw: chosen.append(b))
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    assert train_mod._distributed(torch.device(device)) == (2, 0, True)
    assert chosen == [backend]


def test_task_balance_weights():
    from types import SimpleNamespace

    from sigma_fast.rec.train import TrainConfig, task_weights

    samples = [SimpleNamespace(task="A")] * 90 + [SimpleNamespace(task="B")] * 10
    assert task_weights(samples, 0.0) is None
    w = task_weights(samples, 1.0)
    assert float(w[:90].sum()) == pytest.approx(float(w[90:].sum()))  # every task alike
    w = task_weights(samples, 0.5)
    assert float(w[:90].sum() / w[90:].sum()) == pytest.approx(3.0)   # sqrt(90 / 10)
    g = torch.Generator().manual_seed(0)
    picks = torch.multinomial(task_weights(samples, 1.0), 20000, replacement=True, generator=g)
    assert abs(float((picks >= 90).float().mean()) - 0.5) < 0.02
    with pytest.raises(ValueError, match="task_balance"):
        TrainConfig(task_balance=2.0).check()


def test_per_task_weights_multiply_the_balance():
    from types import SimpleNamespace

    from sigma_fast.rec.train import TrainConfig, task_weights

    samples = [SimpleNamespace(task="A")] * 90 + [SimpleNamespace(task="B")] * 10
    assert task_weights(samples, 0.0, {"A": 1.0, "B": 1.0}) is None
    w = task_weights(samples, 0.0, {"B": 9.0})
    assert float(w[:90].sum()) == pytest.approx(float(w[90:].sum()))
    w = task_weights(samples, 1.0, {"B": 3.0, "C": 5.0})  # tasks without samples are ignored
    assert float(w[90:].sum() / w[:90].sum()) == pytest.approx(3.0)
    for bad in (0.0, -1.0, float("inf"), True, "2"):
        with pytest.raises(ValueError, match=r"task_weights\['B'\] must be a finite number > 0"):
            TrainConfig(task_weights={"B": bad}).check()


def test_fused_adamw_gives_the_plain_update():
    from sigma_fast.rec.train import TrainConfig, _adamw

    torch.manual_seed(0)
    fast = [torch.nn.Parameter(torch.randn(50, 8)), torch.nn.Parameter(torch.randn(7))]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in fast]
    start = [p.detach().clone() for p in fast]
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    opt = _adamw(fast, cfg)
    ref = torch.optim.AdamW(plain, lr=cfg.lr, weight_decay=cfg.weight_decay)
    assert opt.param_groups[0]["fused"] is True
    for _ in range(5):
        for p, q in zip(fast, plain):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q, s in zip(fast, plain, start):
        torch.testing.assert_close(p, q)
        assert (p - s).abs().min() > 0  # every entry moved
