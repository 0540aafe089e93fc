"""Backend reporting, dispatch, and torch integration (custom ops under torch.compile)."""

import numpy as np
import pytest
import torch

import sigma_fast as sf
from sigma_fast.testing import clustered_vectors


def test_backends_report_every_backend_with_a_reason():
    status = sf.backends()
    assert set(status) == {"reference", "cpu", "cuda", "triton"}
    assert status["reference"].available
    for name, st in status.items():
        assert st.name == name and isinstance(st.reason, str) and st.reason
        if not st.available:
            assert bool(st) is False


def test_cpu_backend_is_built():
    st = sf.backends()["cpu"]
    assert st.available, st.reason


def test_build_info_reports_options():
    info = sf.build_info()
    assert {"cuda", "cuda_reason", "sanitize"} <= set(info)


def test_cuda_unavailable_reason_is_specific():
    st = sf.backends()["cuda"]
    if st.available:
        pytest.skip("CUDA backend is available here")
    assert any(w in st.reason for w in ("not built", "no CUDA device", "failed to import"))


def test_default_dispatch_uses_cpu_for_cpu_tensors(monkeypatch):
    import sigma_fast.rq as rq_mod

    called = []
    original = rq_mod._ENCODERS["cpu"]
    monkeypatch.setitem(rq_mod._ENCODERS, "cpu",
                        lambda *a: called.append(True) or original(*a))
    sf.rq_encode(np.zeros((2, 3), np.float32), np.ones((1, 2, 3), np.float32))
    assert called


def test_custom_ops_are_registered():
    assert hasattr(torch.ops.sigma_fast, "rq_encode")
    assert hasattr(torch.ops.sigma_fast, "rq_decode")


def test_custom_ops_pass_opcheck():
    x = torch.from_numpy(clustered_vectors(20, 8, seed=0))
    cb = torch.from_numpy(clustered_vectors(12, 8, seed=1).reshape(2, 6, 8))
    torch.library.opcheck(torch.ops.sigma_fast.rq_encode.default, (x, cb, 2, ""),
                          test_utils=("test_schema", "test_faketensor"))
    codes = torch.zeros((20, 2), dtype=torch.int64)
    torch.library.opcheck(torch.ops.sigma_fast.rq_decode.default, (codes, cb, 2, ""),
                          test_utils=("test_schema", "test_faketensor"))
    out = torch.empty((20, 8))
    torch.library.opcheck(torch.ops.sigma_fast.rq_decode_out.default, (codes, cb, 2, "", out),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    x = torch.from_numpy(clustered_vectors(64, 16, seed=2))
    cb = torch.from_numpy(clustered_vectors(3 * 8, 16, seed=3).reshape(3, 8, 16))

    def quantize_and_reconstruct(v, codebooks):
        codes, err = sf.rq_encode(v * 1.0, codebooks, beam_width=2, return_error=True)
        recon = sf.rq_decode(codes, codebooks)
        again = sf.rq_decode(codes, codebooks, out=torch.empty_like(recon))
        return codes, recon, err.sum() + (again - recon).abs().sum()

    compiled = torch.compile(quantize_and_reconstruct, fullgraph=True)
    got = compiled(x, cb)
    want = quantize_and_reconstruct(x, cb)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[2], want[2])
