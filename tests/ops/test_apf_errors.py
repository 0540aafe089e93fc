"""apf_fuse: bad input gets a clear exception naming what was expected and what was received;
the custom op works under torch.compile."""

import numpy as np
import pytest
import torch

import sigma_fast as sf
from sigma_fast import reference

rng = np.random.default_rng(0)
INDEX = sf.ItemIndex(rng.standard_normal((20, 4)).astype(np.float32), np.arange(20) % 3)
PHI = np.array([[-1.0, -2.0], [-0.5, -np.inf]], np.float32)
PIDS = np.array([[0, 1], [2, -1]])
Q = rng.standard_normal((2, 2, 4)).astype(np.float32)
KW = dict(top_m=3, top_n=5, tau=0.1)


def call(phi=PHI, pids=PIDS, q=Q, index=INDEX, **kw):
    return sf.apf_fuse(phi, pids, q, index, **{**KW, **kw})


@pytest.mark.parametrize(
    "args, exc, words",
    [
        (dict(phi=PHI.astype(np.float64)), TypeError, ["prefix_scores must be float32", "float64"]),
        (dict(phi=PHI[0]), ValueError, ["prefix_scores must be 2-d [B, K]", "[2]"]),
        (dict(pids=PIDS.astype(np.float32)), TypeError, ["prefix_ids must be int32 or int64"]),
        (dict(pids=PIDS[:, :1]), ValueError, ["prefix_ids must be [B, K] = [2, 2]", "[2, 1]"]),
        (dict(q=Q.astype(np.float16)), TypeError, ["queries must be float32", "float16"]),
        (dict(q=Q[:, :, :3]), ValueError, ["queries must be [B, K, D] = [2, 2, 4]", "[2, 2, 3]"]),
        (dict(index="idx"), TypeError, ["index must be a sigma_fast.ItemIndex", "str"]),
        (dict(top_m=0), ValueError, ["top_m must be >= 1; got 0"]),
        (dict(top_n=0), ValueError, ["top_n must be >= 1; got 0"]),
        (dict(top_m=2.0), TypeError, ["top_m must be an int; got float"]),
        (dict(tau=0.0), ValueError, ["tau must be finite and > 0; got 0.0"]),
        (dict(tau=-1), ValueError, ["tau must be finite and > 0; got -1.0"]),
        (dict(tau=float("nan")), ValueError, ["tau must be finite and > 0; got nan"]),
        (dict(tau="0.1"), TypeError, ["tau must be a float; got str"]),
        (dict(sigma_min=-0.1), ValueError, ["sigma_min must be finite and >= 0"]),
        (dict(adaptive=1), TypeError, ["adaptive must be a bool; got int"]),
        (dict(normalize="all"), ValueError, ["normalize must be one of", "'all'"]),
        (dict(allowed=np.ones(20, np.int64)), TypeError, ["allowed must be bool; got int64"]),
        (dict(allowed=np.ones(19, bool)), ValueError,
         ["allowed must be a mask [index.id_bound = 20]", "[B = 2, index.id_bound = 20]",
          "got shape [19]"]),
        (dict(allowed=np.ones((3, 20), bool)), ValueError,
         ["[B = 2, index.id_bound = 20]", "got shape [3, 20]"]),
        (dict(backend="tpu"), ValueError, ["backend must be one of"]),
    ],
)
def test_rejects_bad_arguments(args, exc, words):
    with pytest.raises(exc) as info:
        call(**args)
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_rejects_bad_values(backend):
    for bad in (np.nan, np.inf):
        phi = PHI.copy()
        phi[1, 0] = bad
        with pytest.raises(ValueError, match=r"prefix_scores must be finite or -inf .* at index \[1, 0\]"):
            call(phi=phi, backend=backend)
    for bad in (-1, 3, 2**40):
        pids = PIDS.copy()
        pids[0, 1] = bad
        with pytest.raises(IndexError, match=rf"prefix_ids must lie in \[0, 3\) where "
                                             rf"prefix_scores is finite; got {bad} at index \[0, 1\]"):
            call(pids=pids, backend=backend)
    q = Q.copy()
    q[0, 1, 2] = np.nan
    with pytest.raises(ValueError, match=r"queries must be finite .* queries\[0, 1\]"):
        call(q=q, backend=backend)
    q = Q.copy()
    q[1, 0] = 0
    with pytest.raises(ValueError, match=r"queries must be non-zero .* index \[1, 0\]"):
        call(q=q, backend=backend)
    # Padding beams (-inf) may carry anything.
    q = Q.copy()
    q[1, 1] = np.nan
    call(q=q, backend=backend)


def test_cpu_kernel_rechecks_what_memory_safety_needs():
    core = sf._backends.load_core()
    emb, off, ids = INDEX.embeddings.numpy(), INDEX.offsets.numpy(), INDEX.item_ids.numpy()
    out = [np.empty((2, 5), np.int64), np.empty((2, 5), np.float32), np.empty((2, 5), np.int64)]
    args = lambda **kw: dict(dict(prefix_scores=PHI, prefix_ids=PIDS, queries=Q, embeddings=emb,  # noqa: E731
                                  offsets=off, item_ids=ids, allowed=None, top_m=3, top_n=5,
                                  tau=0.1, adaptive=True, sigma_min=1e-3, normalize_bucket=False,
                                  dedup=True, out_ids=out[0], out_logp=out[1], out_src=out[2]), **kw)
    core.apf_fuse(**args())
    with pytest.raises(IndexError, match=r"prefix_ids\[0, 1\] must lie in \[0, 3\); got 7"):
        core.apf_fuse(**args(prefix_ids=np.array([[0, 7], [2, -1]])))
    with pytest.raises(ValueError, match="offsets must be non-decreasing"):
        core.apf_fuse(**args(offsets=np.array([0, 9, 5, 20])))
    with pytest.raises(ValueError, match="offsets\\[-1\\] must equal the number of items"):
        core.apf_fuse(**args(offsets=np.array([0, 5, 9, 19])))
    with pytest.raises(IndexError, match="outside the allowed mask"):
        core.apf_fuse(**args(allowed=np.ones((1, 10), bool)))
    with pytest.raises(ValueError, match="out_ids: expected shape"):
        core.apf_fuse(**args(out_ids=np.empty((2, 4), np.int64)))
    with pytest.raises(ValueError, match="queries\\[0, 0\\] must be finite and non-zero"):
        core.apf_fuse(**args(queries=np.zeros_like(Q)))


def test_unavailable_backends_say_why():
    if not sf.backends()["cuda"]:
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            call(backend="cuda")


def test_custom_op_is_registered_and_passes_opcheck():
    assert hasattr(torch.ops.sigma_fast, "apf_fuse")
    t = torch.from_numpy
    for rb in (False, True):
        torch.library.opcheck(
            torch.ops.sigma_fast.apf_fuse.default,
            (t(PHI), t(PIDS), t(Q), INDEX.embeddings, INDEX.offsets, INDEX.item_ids,
             torch.ones((1, 20), dtype=torch.bool), 3, 5, 0.1, True, 1e-3, "top_m", True, rb, ""),
            test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    phi, pids, q = torch.from_numpy(PHI), torch.from_numpy(PIDS), torch.from_numpy(Q)

    def retrieve(scores, prefix_ids, queries):
        ids, logp, src = sf.apf_fuse(scores * 1.0, prefix_ids, queries, INDEX, top_m=3, top_n=5,
                                     tau=0.1)
        return ids, logp.exp(), src

    compiled = torch.compile(retrieve, fullgraph=True)
    got = compiled(phi, pids, q)
    want = retrieve(phi, pids, q)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[1], want[1])
    ref = reference.apf_fuse(PHI, PIDS, Q, INDEX, **KW)
    assert np.array_equal(got[0].numpy(), ref[0])
