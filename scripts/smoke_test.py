"""Smoke test of an installed sigma_fast wheel, run by scripts/test.sh in a fresh virtual
environment that has no compiler or build tool on its PATH and only the package's own
dependencies: the package imports from site-packages, reports its backends, runs one call of
every op family on the C++ core (checked against the NumPy reference), ships its type
information, and its command line starts.

    python scripts/smoke_test.py
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

BUILD_TOOLS = ("cc", "gcc", "c++", "g++", "clang", "cmake", "ninja", "make", "nvcc")


def main() -> int:
    found = {t: shutil.which(t) for t in BUILD_TOOLS if shutil.which(t)}
    assert not found, f"build tools on PATH: {found}"

    import numpy as np
    import torch

    import sigma_fast as sf

    pkg = Path(sf.__file__).parent
    assert "site-packages" in pkg.parts, f"sigma_fast imported from {pkg}, not an installation"
    version = importlib.metadata.version("sigma_fast")
    assert sf.__version__ == version, (sf.__version__, version)
    for name in ("py.typed", "_core.pyi", "_cuda.pyi"):
        assert (pkg / name).is_file(), f"{name} missing from the installed package"
    print(f"sigma_fast {sf.__version__} from {pkg}; torch {torch.__version__}, "
          f"numpy {np.__version__}")

    status = sf.backends()
    for name, st in status.items():
        print(f"  {name:10s} {'available' if st else 'unavailable':12s} {st.reason}")
    assert status["cpu"], f"the C++ core does not load: {status['cpu'].reason}"
    assert status["reference"]
    if not status["cuda"]:
        assert status["cuda"].reason, "an unavailable cuda backend must say why"
    print("  build:", sf.build_info())

    rng = np.random.default_rng(0)
    # Residual quantization: encode + decode.
    x = rng.standard_normal((64, 8)).astype(np.float32)
    codebooks = rng.standard_normal((3, 4, 8)).astype(np.float32)
    codes = sf.rq_encode(x, codebooks, beam_width=2, backend="cpu")
    assert np.array_equal(codes, sf.rq_encode(x, codebooks, beam_width=2, backend="reference"))
    x_hat = sf.rq_decode(codes, codebooks, backend="cpu")
    assert np.allclose(x_hat, sf.rq_decode(codes, codebooks, backend="reference"), atol=1e-5)
    print(f"  rq_encode / rq_decode: codes {codes.shape}, reconstruction {x_hat.shape}")

    # Prefix trie + one constrained beam step from the root.
    trie = sf.PrefixTrie(codes, codebook_size=4)
    batch, width = 2, 3
    logits = torch.from_numpy(rng.standard_normal((batch, 1, 4)).astype(np.float32))
    scores = torch.zeros((batch, 1))
    states = torch.zeros((batch, 1), dtype=torch.int64)
    steps = [sf.constrained_beam_step(logits, scores, states, trie, beam_width=width, backend=b)
             for b in ("cpu", "reference")]
    for got, want in zip(steps[0], steps[1]):
        assert torch.allclose(got.float(), want.float()), (steps[0], steps[1])
    print(f"  PrefixTrie ({trie.num_nodes} nodes) + constrained_beam_step: "
          f"tokens {steps[0].token.tolist()}")

    # Item index bucketed by the first code + adaptive probabilistic fusion.
    index = sf.ItemIndex(x, codes[:, 0])
    k = 2
    prefix_scores = np.log(np.array([[0.6, 0.3], [0.5, 0.4]], dtype=np.float32))
    prefix_ids = np.array([[0, 1], [2, 3]], dtype=np.int64)
    queries = rng.standard_normal((batch, k, 8)).astype(np.float32)
    fused = [sf.apf_fuse(prefix_scores, prefix_ids, queries, index, top_m=5, top_n=4, tau=0.05,
                         backend=b) for b in ("cpu", "reference")]
    assert np.array_equal(fused[0][0], fused[1][0]), (fused[0][0], fused[1][0])
    assert np.allclose(fused[0][1], fused[1][1], atol=1e-5)
    print(f"  ItemIndex + apf_fuse: items {np.asarray(fused[0][0]).tolist()}")

    # The command line.
    exe = shutil.which("sigma-fast")
    assert exe is not None, "the sigma-fast command is not installed"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: sigma-fast" in out.stdout, out.stdout + out.stderr
    print(f"  sigma-fast --help: {len(out.stdout.splitlines())} lines")
    print("smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
