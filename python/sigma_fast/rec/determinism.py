"""Bit-reproducible training: every training loop of ``sigma_fast.rec`` (SFT, the BPR teacher,
the grounding tower, SASRec) runs inside :func:`deterministic`.

Why: with more than one intra-op thread, torch's CPU ``index_put_(accumulate=True)`` — the
backward of advanced indexing such as ``hidden[rows, positions]`` or ``table[ids]`` — adds
duplicate indices in whatever order the threads reach them, so two runs of the same seeded
training drift apart from the first step (float addition is not associative). Under
``torch.use_deterministic_algorithms(True)`` torch sorts the indices first and accumulates in a
fixed order. Every random draw of the loops comes from generators seeded by the run's seed, so
two runs then give bit-identical weights on the same machine with the same torch version and the
same intra-op thread count (``torch.get_num_threads()``: the split of reductions and matrix
products over threads can change float rounding, so a run on another thread count may differ in
the last bits).

On CUDA, deterministic kernels need ``CUBLAS_WORKSPACE_CONFIG`` (set here to ``:4096:8`` when
unset, before the first cuBLAS call) and cuDNN's non-deterministic autotuning off; ops with no
deterministic CUDA implementation warn instead of raising.
"""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["deterministic"]


@contextlib.contextmanager
def deterministic(device=None):
    """Run the block with torch's deterministic algorithms (restoring the previous setting on
    exit). ``device``: the device the block trains on (a CUDA device also turns off cuDNN
    autotuning and lets ops without a deterministic CUDA kernel warn instead of raise)."""
    cuda = device is not None and torch.device(device).type == "cuda"
    was = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_bench = torch.backends.cudnn.benchmark
    if cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=cuda)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
        torch.backends.cudnn.benchmark = was_bench
