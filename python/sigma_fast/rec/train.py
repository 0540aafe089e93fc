"""Multi-task instruction SFT of a ``SigmaModel`` (DESIGN.md §1.3).

AdamW (torch's fused kernel where it has one) with linear warm-up then a cosine decay (to
``min_lr_ratio`` of the peak), gradient accumulation, gradient clipping, batches mixing every
task, periodic validation HR@10 with the model's own generation, and a checkpoint (model +
optimizer + schedule + step) written atomically every ``save_every`` steps and at the end;
``resume=True`` continues from it and gives the same weights as an uninterrupted run (batches and
hard negatives are drawn from generators seeded by (seed, step)). Training runs under
:func:`~sigma_fast.rec.determinism.deterministic`, so two runs of the same configuration give
bit-identical weights on the same machine.

A checkpoint holds only tensors and JSON (``model/`` as ``save_pretrained``,
``trainer_state.safetensors`` with the model, optimizer and RNG tensors, ``trainer_state.json``
with the step, schedule, optimizer settings, history and the tensors' SHA-256): loading it never
runs code, whoever wrote the run directory.

Runs unchanged under ``torchrun``: with ``WORLD_SIZE`` > 1 it joins the process group (gloo for
a CPU model, NCCL for a CUDA one), wraps the model in DistributedDataParallel and gives each rank
its own share of every step's batch; rank 0 validates and writes checkpoints.

>>> history = train_sigma(model, train_samples, out_dir="run/train",
...                       config=TrainConfig(steps=800, batch_size=32), valid_samples=valid)
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import _threads
from .._io import (Field, atomic_directory, atomic_save_tensors, atomic_write_json,
                   load_tensors, read_artifact_config, sha256_file)
from .determinism import deterministic

__all__ = ["TrainConfig", "train_sigma", "hit_rate"]

CHECKPOINT_DIR = "checkpoint"
STATE_FORMAT = "sigma_fast.TrainerState"
STATE_VERSION = 1
STATE_FILE = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE_FILE = "trainer_state.pt"  # torch.save pickles of older versions: never loaded


@dataclass
class TrainConfig:
    """Optimisation settings (every field has the default used by the demo).

    steps: optimizer steps. batch_size: samples per step per process (after accumulation).
    grad_accum: micro-batches per step (batch_size must be divisible by it). lr: peak learning
    rate; weight_decay: AdamW decoupled weight decay; warmup: fraction of steps of linear
    warm-up; min_lr_ratio: final learning rate / peak; max_grad_norm: clipping (0 = off).
    eval_every: steps between validations (0 = only at the end); eval_samples: validation
    requests used; save_every: steps between checkpoints (0 = only at the end); seed.
    task_balance: how batches mix the tasks: a sample of a task with n training samples is
    drawn with probability ∝ n^-task_balance (0 = every sample alike, so tasks in proportion to
    their sizes; 1 = every task alike). task_weights: extra sampling weight per task name
    (missing tasks weigh 1), multiplied into the above: {"Discover": 4.0} draws Discover
    samples four times as often.
    """

    steps: int = 800
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.05
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    eval_every: int = 200
    eval_samples: int = 200
    save_every: int = 200
    seed: int = 0
    task_balance: float = 0.0
    task_weights: dict | None = None

    def check(self) -> "TrainConfig":
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"steps, batch_size and grad_accum must be >= 1; got {self.steps}, "
                             f"{self.batch_size}, {self.grad_accum}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by grad_accum "
                             f"({self.grad_accum})")
        if not 0 <= self.task_balance <= 1:
            raise ValueError(f"task_balance must be in [0, 1]; got {self.task_balance!r}")
        for task, w in (self.task_weights or {}).items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < float("inf"):
                raise ValueError(f"task_weights[{task!r}] must be a finite number > 0; got {w!r}")
        if not self.lr > 0 or not 0 <= self.warmup < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0, 0 <= warmup < 1, 0 <= min_lr_ratio <= 1; got "
                             f"{self.lr}, {self.warmup}, {self.min_lr_ratio}")
        return self


def task_weights(samples, balance: float, per_task: dict | None = None) -> torch.Tensor | None:
    """float64 [n] sampling weights ∝ n_task^-balance × per_task[task] (None when balance is 0
    and every per-task weight is 1: uniform)."""
    per_task = {t: float(w) for t, w in (per_task or {}).items() if float(w) != 1.0}
    if not balance and not per_task:
        return None
    tasks = [getattr(s, "task", "") for s in samples]
    counts: dict[str, int] = {}
    for t in tasks:
        counts[t] = counts.get(t, 0) + 1
    return torch.tensor([counts[t] ** -balance * per_task.get(t, 1.0) for t in tasks],
                        dtype=torch.float64)


def lr_lambda(config: TrainConfig):
    warm = max(1, int(round(config.warmup * config.steps)))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, config.steps - warm)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def hit_rate(model, samples, *, k: int = 10, **options) -> float:
    """HR@k of the model's own generation on ``samples`` (their targets)."""
    from .generate import recommend

    was_training = model.training
    try:
        out = recommend(model, samples, top_n=k, **options)
    finally:
        model.train(was_training)
    targets = torch.tensor([int(s.target) for s in samples])
    return float((out.item_ids == targets[:, None]).any(1).float().mean())


def _distributed(device: torch.device):
    """(world size, rank, whether the group was created here). The group's backend follows the
    model's device (NCCL for a CUDA model, gloo otherwise), not whether a GPU exists: a CPU
    model on a GPU machine needs gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0, False
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    return dist.get_world_size(), dist.get_rank(), created


def _adamw(params: list, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW, with torch's fused kernel where it has one for the parameters (float tensors on
    CPU or CUDA): one pass over each tensor instead of one per elementwise operation, the same
    update up to float rounding. On two CPU cores this takes the optimizer from about 14 % of a
    demo SFT step to 4 % (bench/bench_optimizer.py). A checkpoint keeps the setting it was made
    with, so a resumed run continues with the same kernel."""
    kwargs = {"lr": config.lr, "weight_decay": config.weight_decay}
    if params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        kwargs["fused"] = True
    return torch.optim.AdamW(params, **kwargs)


def _save_checkpoint(out_dir: Path, model, optimizer, scheduler, step: int, history: list,
                     config: TrainConfig) -> Path:
    """Replace ``out_dir/checkpoint`` atomically (assembled in a temporary sibling)."""
    final = out_dir / CHECKPOINT_DIR
    with atomic_directory(final) as tmp:
        model.save_pretrained(tmp / "model")
        tensors, opt_json = _state_tensors(model, optimizer)
        atomic_save_tensors(tmp / STATE_TENSORS, tensors, metadata={"format": STATE_FORMAT})
        atomic_write_json(tmp / STATE_FILE, {
            "format": STATE_FORMAT, "format_version": STATE_VERSION, "step": step,
            "history": history, "config": asdict(config), "scheduler": scheduler.state_dict(),
            "optimizer": opt_json, "tensors_sha256": sha256_file(tmp / STATE_TENSORS)})
        atomic_write_json(tmp / "progress.json", {"step": step, "steps": config.steps,
                                                  "history": history})
    return final


def _state_tensors(model, optimizer) -> tuple[dict, dict]:
    """(tensors, JSON) of the trainer state: the model's weights ("model.<name>"), every
    optimizer state tensor ("optimizer.<param>.<key>") and the RNG states ("rng.cpu",
    "rng.cuda.<i>") as tensors; the optimizer's parameter groups and non-tensor state as JSON.
    Tensors are copied (tied weights share storage, which safetensors refuses)."""
    tensors = {f"model.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict = {}
    for pid, entry in opt["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().cpu().clone()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if next(model.parameters()).is_cuda:
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    return tensors, {"param_groups": opt["param_groups"], "state": scalars}


_STATE_FIELDS = {
    "step": Field("int", lo=0), "history": Field("list"), "config": Field("dict"),
    "scheduler": Field("dict"), "optimizer": Field("dict"), "tensors_sha256": Field("sha256"),
}


def _load_checkpoint(out_dir: Path, model, optimizer, scheduler, config: TrainConfig):
    """(step, history) of the checkpoint in ``out_dir``, with the model, optimizer, scheduler
    and RNG restored from it; (0, []) when there is none. Reads JSON and safetensors only."""
    ckpt = out_dir / CHECKPOINT_DIR
    state_path = ckpt / STATE_FILE
    if not state_path.is_file():
        if (ckpt / LEGACY_STATE_FILE).is_file():
            raise ValueError(
                f"{ckpt / LEGACY_STATE_FILE} is a checkpoint in the old torch.save format (a "
                f"pickle, which sigma_fast never loads: unpickling a file can run arbitrary "
                f"code); delete {ckpt} to train from scratch (or pass resume=False), or retrain "
                f"the run")
        return 0, []
    _, path, state = read_artifact_config(ckpt, STATE_FILE, STATE_FORMAT, STATE_VERSION,
                                          "a training checkpoint", _STATE_FIELDS)
    saved = state["config"]
    if saved.get("steps") != config.steps or saved.get("batch_size") != config.batch_size:
        raise ValueError(f"{path}: the checkpoint was made with steps={saved.get('steps')}, "
                         f"batch_size={saved.get('batch_size')}; got {config.steps}, "
                         f"{config.batch_size} (use a new out_dir or resume=False)")
    if state["step"] > config.steps:
        raise ValueError(f"{path}: field 'step' must be in [0, {config.steps}]; got "
                         f"{state['step']}")
    tensors = load_tensors(ckpt / STATE_TENSORS, sha256=state["tensors_sha256"],
                           config_path=path)
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise ValueError(f"{ckpt / STATE_TENSORS}: the checkpoint does not match this model (a "
                         f"different backbone, vocabulary or variant?); delete {ckpt} or pass "
                         f"resume=False. Details: {str(exc)[:300]}") from exc
    _restore_optimizer(optimizer, state["optimizer"], tensors, ckpt / STATE_TENSORS, path)
    try:
        scheduler.load_state_dict(dict(state["scheduler"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: malformed field 'scheduler': {exc}") from exc
    _restore_rng(tensors, ckpt / STATE_TENSORS)
    return state["step"], list(state["history"])


def _restore_optimizer(optimizer, saved: dict, tensors: dict, tensor_path: Path,
                       path: Path) -> None:
    groups, scalars = saved.get("param_groups"), saved.get("state", {})
    current = optimizer.state_dict()["param_groups"]
    if (not isinstance(groups, list) or not isinstance(scalars, dict)
            or len(groups) != len(current)
            or any(not isinstance(g, dict) or g.get("params") != c["params"]
                   for g, c in zip(groups, current))):
        raise ValueError(f"{path}: field 'optimizer' does not describe this model's optimizer "
                         f"(parameter groups {[c['params'][:3] for c in current]}...)")
    groups = [{k: tuple(v) if isinstance(c.get(k), tuple) and isinstance(v, list) else v
               for k, v in g.items()} for g, c in zip(groups, current)]
    params = {pid: p for group, pg in zip(current, optimizer.param_groups)
              for pid, p in zip(group["params"], pg["params"])}
    state: dict = {}
    for name, value in tensors.items():
        if not name.startswith("optimizer."):
            continue
        pid_text, _, key = name[len("optimizer."):].partition(".")
        pid = int(pid_text) if pid_text.isdigit() else -1
        if pid not in params or not key:
            raise ValueError(f"{tensor_path}: tensor {name!r} names no parameter of this "
                             f"model's optimizer")
        if value.dim() and value.shape != params[pid].shape:
            raise ValueError(f"{tensor_path}: tensor {name!r} must have the shape of parameter "
                             f"{pid}, {list(params[pid].shape)}; got {list(value.shape)}")
        state.setdefault(pid, {})[key] = value
    for pid_text, entry in scalars.items():
        if not (pid_text.isdigit() and int(pid_text) in params and isinstance(entry, dict)):
            raise ValueError(f"{path}: field 'optimizer' has state for unknown parameter "
                             f"{pid_text!r}")
        state.setdefault(int(pid_text), {}).update(entry)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: malformed optimizer state: {exc}") from exc


def _restore_rng(tensors: dict, tensor_path: Path) -> None:
    cpu = tensors.get("rng.cpu")
    now = torch.get_rng_state()
    if cpu is None or cpu.dtype != torch.uint8 or cpu.shape != now.shape:
        raise ValueError(f"{tensor_path}: expected tensor 'rng.cpu' (uint8 {list(now.shape)}, "
                         f"torch's CPU generator state)")
    torch.set_rng_state(cpu)
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")),
                  key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of SFT step ``step``: it draws the step's batch and its negatives, so a
    resumed run repeats the uninterrupted one."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def train_sigma(model, train_samples, *, out_dir, config: TrainConfig | None = None,
                valid_samples=None, resume: bool = True, progress: bool | None = None,
                eval_options: dict | None = None) -> list[dict]:
    """Train ``model`` on ``train_samples`` (a list of ``TaskSample``, all tasks mixed).

    Returns the history: one dict per validation ({"step", "loss", "ntp", "nce", "hr@10",
    "samples_per_s"}). ``out_dir/checkpoint`` holds the latest checkpoint (``model/`` as
    ``save_pretrained`` + ``trainer_state.json`` / ``.safetensors``); with ``resume`` training
    continues from it. A checkpoint of the old ``trainer_state.pt`` format (a pickle) is refused,
    never loaded.
    """
    from tqdm.auto import tqdm

    config = (config or TrainConfig()).check()
    if not train_samples:
        raise ValueError("train_samples is empty")
    out_dir = Path(out_dir)
    world, rank, created_group = _distributed(next(model.parameters()).device)
    optimizer = _adamw([p for p in model.parameters() if p.requires_grad], config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    step, history = 0, []
    if resume:
        step, history = _load_checkpoint(out_dir, model, optimizer, scheduler, config)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, find_unused_parameters=True)
    micro = config.batch_size // config.grad_accum
    n = len(train_samples)
    weights = task_weights(train_samples, config.task_balance, config.task_weights)
    valid = list(valid_samples or [])[: config.eval_samples]
    eval_options = {"num_beams": 10, "top_m": 50, "batch_size": 32, **(eval_options or {})}
    show = rank == 0 and (progress if progress is not None else None)
    bar = tqdm(total=config.steps, initial=step, desc="SFT", disable=(not show)
               if show is not None else (rank != 0), dynamic_ncols=True)
    model.train()
    run = {"loss": 0.0, "ntp": 0.0, "nce": 0.0, "n": 0}
    t0, seen = time.perf_counter(), 0
    # Deterministic kernels for the whole loop (entered here, not as a `with`, to leave the
    # loop's body as it is).
    determinism = contextlib.ExitStack()
    determinism.enter_context(deterministic(next(model.parameters()).device))
    try:
        while step < config.steps:
            _threads.adapt()  # thread counts follow the free CPUs (shared cores)
            g = step_generator(config.seed, step)
            if weights is None:
                picks = torch.randint(n, (config.batch_size * world,), generator=g)
            else:
                picks = torch.multinomial(weights, config.batch_size * world, replacement=True,
                                          generator=g)
            picks = picks[rank * config.batch_size:(rank + 1) * config.batch_size].tolist()
            for a in range(config.grad_accum):
                batch = model.collate([model.encode(train_samples[i])
                                       for i in picks[a * micro:(a + 1) * micro]])
                out = net(batch, generator=g)
                (out["loss"] / config.grad_accum).backward()
                for key in ("loss", "ntp", "nce"):
                    run[key] += float(out[key].detach()) / config.grad_accum
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            run["n"] += 1
            seen += config.batch_size * world
            bar.update(1)
            bar.set_postfix(loss=f"{run['loss'] / run['n']:.3f}",
                            lr=f"{scheduler.get_last_lr()[0]:.2e}")
            last = step == config.steps
            if rank == 0 and (last or (config.eval_every and step % config.eval_every == 0)):
                rec = {"step": step, **{k: run[k] / max(run["n"], 1) for k in
                                        ("loss", "ntp", "nce")},
                       "samples_per_s": seen / (time.perf_counter() - t0)}
                if valid:
                    rec["hr@10"] = hit_rate(model, valid, k=10, **eval_options)
                history.append(rec)
                bar.write(f"step {step}: " + ", ".join(
                    f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in rec.items() if k != "step"))
                run = {"loss": 0.0, "ntp": 0.0, "nce": 0.0, "n": 0}
                t0, seen = time.perf_counter(), 0
            if rank == 0 and (last or (config.save_every and step % config.save_every == 0)):
                _save_checkpoint(out_dir, model, optimizer, scheduler, step, history, config)
    finally:
        determinism.close()
        bar.close()
        if created_group:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
    model.eval()
    return history

