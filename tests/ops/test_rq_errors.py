"""Bad input gets a clear exception naming what was expected and what was received."""

import numpy as np
import pytest
import torch

import sigma_fast as sf

X = np.zeros((4, 3), dtype=np.float32)
CB = np.zeros((2, 5, 3), dtype=np.float32)


@pytest.mark.parametrize(
    "x, cb, exc, words",
    [
        (X.astype(np.float64), CB, TypeError, ["x must be float32", "float64"]),
        (X, CB.astype(np.float16), TypeError, ["codebooks must be float32", "float16"]),
        (X[0], CB, ValueError, ["x must be 2-d", "[3]"]),
        (X, CB[0], ValueError, ["codebooks must be 3-d", "[5, 3]"]),
        (X, np.zeros((2, 5, 4), np.float32), ValueError, ["D = 3", "[2, 5, 4]"]),
        (X, np.zeros((2, 0, 3), np.float32), ValueError, ["K >= 1", "[2, 0, 3]"]),
        (X, np.zeros((0, 5, 3), np.float32), ValueError, ["L >= 1"]),
        ([[1.0, 2.0, 3.0]], CB, TypeError, ["torch.Tensor or numpy.ndarray", "list"]),
    ],
)
def test_encode_rejects_bad_shapes_and_types(x, cb, exc, words):
    with pytest.raises(exc) as info:
        sf.rq_encode(x, cb)
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encode_rejects_non_finite(backend, bad):
    x = X.copy()
    x[2, 1] = bad
    with pytest.raises(ValueError, match=r"x must be finite; got .* at index \[2, 1\]"):
        sf.rq_encode(x, CB, backend=backend)
    cb = CB.copy()
    cb[1, 4, 0] = bad
    with pytest.raises(ValueError, match="codebooks must be finite"):
        sf.rq_encode(X, cb, backend=backend)


def test_encode_rejects_bad_beam_width():
    with pytest.raises(ValueError, match="beam_width must be >= 1; got 0"):
        sf.rq_encode(X, CB, beam_width=0)
    with pytest.raises(TypeError, match="beam_width must be an int; got float"):
        sf.rq_encode(X, CB, beam_width=2.0)


def test_unknown_or_mismatched_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        sf.rq_encode(X, CB, backend="tpu")
    if not sf.backends()["cuda"]:
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            sf.rq_encode(X, CB, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix devices")
def test_device_mismatch():
    with pytest.raises(ValueError, match="same device"):
        sf.rq_encode(torch.zeros(4, 3, device="cuda"), torch.zeros(2, 5, 3))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("bad", [-1, 5, 2**40])
def test_decode_rejects_out_of_range_codes(backend, bad):
    codes = np.zeros((3, 2), dtype=np.int64)
    codes[1, 1] = bad
    with pytest.raises(IndexError, match=rf"codes must lie in \[0, 5\); got {bad} at index \[1, 1\]"):
        sf.rq_decode(codes, CB, backend=backend)


def test_decode_rejects_bad_arguments():
    with pytest.raises(TypeError, match="codes must be int32 or int64; got float32"):
        sf.rq_decode(np.zeros((3, 2), np.float32), CB)
    with pytest.raises(ValueError, match="at most L = 2 columns"):
        sf.rq_decode(np.zeros((3, 3), np.int64), CB)
    with pytest.raises(ValueError, match="levels must be <= 2"):
        sf.rq_decode(np.zeros((3, 2), np.int64), CB, levels=3)
    with pytest.raises(ValueError, match="levels must be >= 0"):
        sf.rq_decode(np.zeros((3, 2), np.int64), CB, levels=-1)


def test_decode_rejects_bad_out_buffers():
    codes = np.zeros((3, 2), np.int64)
    with pytest.raises(TypeError, match="out must be float32; got float64"):
        sf.rq_decode(codes, CB, out=np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"out must be \[N, D\] = \[3, 3\].*got shape \[3, 4\]"):
        sf.rq_decode(codes, CB, out=np.zeros((3, 4), np.float32))
    ro = np.zeros((3, 3), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writable"):
        sf.rq_decode(codes, CB, out=ro)
    with pytest.raises(ValueError, match="out rows must be contiguous"):
        sf.rq_decode(codes, CB, out=np.zeros((3, 3), np.float32, order="F"))
    cb = torch.from_numpy(CB.copy())
    with pytest.raises(ValueError, match="out must not share memory with codebooks"):
        sf.rq_decode(torch.from_numpy(codes), cb, out=cb[0, :3])
    with pytest.raises(TypeError, match="out must be a torch.Tensor or numpy.ndarray"):
        sf.rq_decode(codes, CB, out=[[0.0] * 3] * 3)


def test_core_binding_rejects_bad_buffers():
    """The C++ binding re-checks what memory safety depends on."""
    core = pytest.importorskip("sigma_fast._core")
    codes = np.zeros((4, 2), np.int64)
    with pytest.raises(ValueError, match="codes: expected shape"):
        core.rq_encode(X, CB, 1, np.zeros((4, 3), np.int64), None)
    with pytest.raises(ValueError, match="expected dtype"):
        core.rq_encode(X.astype(np.float64), CB, 1, codes, None)
    with pytest.raises(ValueError, match="read-only"):
        ro = codes.copy()
        ro.flags.writeable = False
        core.rq_encode(X, CB, 1, ro, None)
    with pytest.raises(IndexError, match="code 9 at row 0, level 0"):
        core.rq_decode(np.full((1, 2), 9, np.int64), CB, 2, np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="beam_width must be >= 1"):
        core.rq_encode(X, CB, 0, codes, None)
