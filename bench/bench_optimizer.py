"""The SFT optimizer step: sigma_fast's AdamW (torch's fused kernel, ``rec.train._adamw``)
against torch's default AdamW on the same parameters.

Workload: the trainable parameters of the demo's ``tiny`` SIGMA backbone (2 Llama layers, hidden
128, the 30,522-token MiniLM WordPiece vocabulary plus about a thousand semantic-ID tokens, tied
embeddings: 4.33 M floats, most of them the embedding table), with random gradients; one
``optimizer.step()`` per call. Roofline unit: the bytes an AdamW step must move, 7 × 4 per
parameter (read the parameter, its gradient and both moments; write the parameter and both
moments), against an in-place streaming update measured in the same run (torch's ``mul_`` over 256
MiB on every thread: the same read-modify-write pattern; the conftest's single-threaded copy rate
understates what two threads reach).
"""

from __future__ import annotations

import time

import pytest
import torch

SID_TOKENS = 4 * 256 + 4  # ID tokens SigmaModel adds to the vocabulary (levels × codes, specials)
PROVIDERS = ("sigma_fast (fused AdamW)", "torch AdamW (default)")


def _parameters():
    from sigma_fast.rec.model import load_backbone

    backbone, tokenizer = load_backbone("tiny", hidden_size=128, seed=0)
    backbone.resize_token_embeddings(len(tokenizer) + SID_TOKENS, mean_resizing=False)
    params = [p for p in backbone.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


@pytest.fixture(scope="module")
def stream_gbs():
    x = torch.ones(64 * 2**20)  # 256 MiB
    x.mul_(1.0)
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        x.mul_(1.0)
        best = min(best, time.perf_counter() - t)
    return 2 * x.numel() * 4 / best / 1e9


@pytest.mark.parametrize("provider", PROVIDERS)
def test_adamw_step(benchmark, stream_gbs, record, provider):
    from sigma_fast.rec.train import TrainConfig, _adamw

    params = _parameters()
    cfg = TrainConfig(lr=2e-3, weight_decay=0.01)
    if provider.startswith("sigma_fast"):
        opt = _adamw(params, cfg)
        assert opt.param_groups[0]["fused"] is True
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt.step()  # allocate the moments outside the timing
    benchmark.pedantic(opt.step, rounds=30, warmup_rounds=3)
    n = sum(p.numel() for p in params)
    seconds = benchmark.stats.stats.min
    gbs = 7 * 4 * n / seconds / 1e9
    benchmark.extra_info.update(params=n, gbs=gbs, roofline=gbs / stream_gbs)
    record("SFT optimizer step (demo backbone)", provider, steps_per_s=1.0 / seconds,
           ms=seconds * 1e3, gb_s=gbs, stream_gb_s=stream_gbs, roofline_share=gbs / stream_gbs)
