"""Type stubs of ``sigma_fast._cuda``, the optional CUDA backend (cuda/bindings*.cpp).

Torch-free: device pointers (``tensor.data_ptr()``) and the stream (``stream.cuda_stream``) are
passed as ints; a pointer argument may be 0 where the docstring says so. Every launch is
asynchronous on ``stream``. tests/test_stubs.py checks these signatures against the
compiled module wherever it imports.
"""

workspace_budget_bytes: int

def device_count() -> int:
    """Visible CUDA devices (0 when none or no driver)."""

# ---------------------------------------------------------------- residual quantization
def rq_encode_workspace_bytes(n: int, d: int, levels: int, k: int, beam_width: int) -> int:
    """Bytes of device scratch rq_encode needs (0 for n == 0)."""

def rq_encode(
    x_ptr: int,
    n: int,
    d: int,
    ldx: int,
    codebooks_ptr: int,
    levels: int,
    k: int,
    beam_width: int,
    codes_ptr: int,
    err_ptr: int,
    ws_ptr: int,
    ws_bytes: int,
    stream: int,
) -> None:
    """x [n, d] (row stride ldx), codebooks [levels, k, d] -> codes int64 [n, levels] and
    err float32 [n] (err_ptr may be 0)."""

def rq_decode(
    codes_ptr: int,
    codes_is_int64: bool,
    n: int,
    ldc: int,
    levels: int,
    codebooks_ptr: int,
    k: int,
    d: int,
    out_ptr: int,
    stream: int,
) -> None:
    """out [n, d] = sum over l < levels of codebooks[l, codes[i * ldc + l]]."""

# ---------------------------------------------------------------- APF
def apf_workspace_bytes(batch: int, k: int, dim: int, top_m: int) -> int:
    """Bytes of device scratch apf_fuse needs."""

def apf_fuse(
    prefix_scores_ptr: int,
    prefix_ids_ptr: int,
    queries_ptr: int,
    batch: int,
    k: int,
    embeddings_ptr: int,
    emb_type: int,
    num_items: int,
    dim: int,
    offsets_ptr: int,
    num_buckets: int,
    item_ids_ptr: int,
    allowed_ptr: int,
    allowed_ld: int,
    allowed_length: int,
    top_m: int,
    top_n: int,
    tau: float,
    adaptive: bool,
    sigma_min: float,
    normalize_bucket: bool,
    dedup: bool,
    out_ids_ptr: int,
    out_logp_ptr: int,
    out_src_ptr: int,
    bucket_ids_ptr: int,
    bucket_sims_ptr: int,
    ws_ptr: int,
    ws_bytes: int,
    stream: int,
) -> None:
    """Adaptive probabilistic fusion; emb_type 0/1/2 = float32/float16/bfloat16;
    allowed_ptr, bucket_ids_ptr and bucket_sims_ptr may be 0."""

# ---------------------------------------------------------------- constrained beam step
def constrained_beam_step_workspace_bytes(batch: int, beams_in: int, k: int, beam_width: int) -> int:
    """Bytes of device scratch constrained_beam_step needs."""

def constrained_beam_step(
    logits_ptr: int,
    batch: int,
    beams_in: int,
    k: int,
    ld_b: int,
    ld_w: int,
    beam_scores_ptr: int,
    states_ptr: int,
    child_offsets_ptr: int,
    child_tokens_ptr: int,
    child_nodes_ptr: int,
    num_nodes: int,
    slots: int,
    allowed_ptr: int,
    ld_allowed: int,
    beam_width: int,
    normalize: int,
    scores_ptr: int,
    parent_ptr: int,
    token_ptr: int,
    state_ptr: int,
    status_ptr: int,
    ws_ptr: int,
    ws_bytes: int,
    stream: int,
) -> None:
    """One fused constrained beam step; allowed_ptr may be 0; status int32 [batch, 2] gets
    (BeamStepStatus, beam)."""
