"""Type stubs of ``sigma_fast._core``, the torch-free C++ core (csrc/bindings*.cpp).

Arrays are NumPy arrays of exactly the dtype named (the bindings check dtype, rank, shape,
contiguity and writability and raise ValueError otherwise); outputs are caller-allocated and
written in place. tests/test_stubs.py checks these signatures against the compiled module.
"""

from typing import Any

import numpy as np
from numpy.typing import NDArray

_F32 = NDArray[np.float32]
_I64 = NDArray[np.int64]
_Codes = NDArray[np.int32] | NDArray[np.int64]
_Bool = NDArray[np.bool_]

sanitized: bool
"""True when the core was built with AddressSanitizer + UBSan (SIGMA_FAST_SANITIZE=ON)."""

def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def dot_kernel_name() -> str: ...

# ---------------------------------------------------------------- residual quantization
def rq_encode(
    x: _F32,
    codebooks: _F32,
    beam_width: int,
    codes: _I64,
    err: _F32 | None = None,
    strategy: str = "auto",
) -> None:
    """x [N, D] (rows contiguous), codebooks [L, K, D] -> codes [N, L] and, when given,
    err [N]; strategy 'auto', 'direct' or 'cross'."""

def rq_decode(codes: _Codes, codebooks: _F32, levels: int, out: _F32) -> None:
    """out [N, D] = sum over l < levels of codebooks[l, codes[:, l]]."""

# ---------------------------------------------------------------- prefix trie, beam step
def trie_build(codes: _Codes, codebook_size: int) -> dict[str, Any]:
    """The CSR trie of codes [N, L]: {'num_nodes': int} and int64 arrays 'level_offsets',
    'child_offsets', 'child_tokens', 'child_nodes', 'node_parent', 'item_begin', 'item_end',
    'item_perm', 'root_children'."""

def trie_walk(
    tokens: _Codes, child_offsets: _I64, child_tokens: _I64, child_nodes: _I64, out: _I64
) -> None:
    """out [B] = the node reached by each row of tokens [B, l], or -1."""

def trie_allowed_nodes(
    item_mask: _Bool, item_perm: _I64, item_begin: _I64, item_end: _I64, out: _Bool
) -> None:
    """out [M, num_nodes]: nodes with at least one allowed item below, per mask row [M, I]."""

def constrained_beam_step(
    logits: _F32,
    beam_scores: _F32,
    states: _I64,
    child_offsets: _I64,
    child_tokens: _I64,
    child_nodes: _I64,
    allowed: _Bool | None,
    beam_width: int,
    normalize: int,
    pad_empty: bool,
) -> tuple[_F32, _I64, _I64, _I64]:
    """(scores, parent, token, next_states), each [B, beam_width]; normalize 0 (full),
    1 (valid) or 2 (none)."""

def constrained_beam_step_ptr(
    logits: int,
    batch: int,
    beams_in: int,
    k: int,
    ld_b: int,
    ld_w: int,
    beam_scores: int,
    states: int,
    child_offsets: _I64,
    child_tokens: _I64,
    child_nodes: _I64,
    allowed: int,
    ld_allowed: int,
    beam_width: int,
    normalize: int,
    pad_empty: bool,
) -> tuple[_F32, _I64, _I64, _I64]:
    """constrained_beam_step with the per-call inputs given as addresses of live CPU buffers
    (allowed 0 = none)."""

# ---------------------------------------------------------------- item index, APF
def item_index_build(
    embeddings: _F32,
    buckets: _I64,
    num_buckets: int,
    item_ids: _I64 | None,
    out_emb: _F32,
    offsets: _I64,
    out_ids: _I64,
    positions: _I64,
) -> None:
    """Sort embeddings [N, D] into num_buckets buckets: out_emb [N, D], offsets
    [num_buckets + 1], out_ids [N], positions [N]."""

def apf_fuse(
    prefix_scores: _F32,
    prefix_ids: _I64,
    queries: _F32,
    embeddings: _F32,
    offsets: _I64,
    item_ids: _I64,
    allowed: _Bool | None,
    top_m: int,
    top_n: int,
    tau: float,
    adaptive: bool,
    sigma_min: float,
    normalize_bucket: bool,
    dedup: bool,
    out_ids: _I64,
    out_logp: _F32,
    out_src: _I64,
    bucket_ids: _I64 | None = None,
    bucket_sims: _F32 | None = None,
) -> None:
    """Adaptive probabilistic fusion into out_ids / out_logp / out_src [B, top_n] (and the
    per-prefix candidates bucket_ids / bucket_sims [B, K, top_m] when given)."""
