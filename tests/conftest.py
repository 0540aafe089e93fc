import os

# The Triton kernels run on the CPU interpreter where there is no GPU; the variable must be set
# before triton is first imported.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import sigma_fast  # noqa: E402

settings.register_profile(
    "default", deadline=None, max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

ALL_BACKENDS = ("reference", "cpu", "cuda", "triton")


def _selected_backends():
    """SIGMA_FAST_TEST_BACKENDS=cpu,reference restricts the backend-parametrized tests (the
    sanitizer run uses it to exercise only the C++ core)."""
    env = os.environ.get("SIGMA_FAST_TEST_BACKENDS")
    return tuple(b.strip() for b in env.split(",")) if env else ALL_BACKENDS


def backend_params(exclude=()):
    """pytest params for every backend; unavailable ones are skipped with the reason."""
    status = sigma_fast.backends()
    selected = _selected_backends()
    params = []
    for name in ALL_BACKENDS:
        if name in exclude:
            continue
        marks = []
        if name not in selected:
            marks.append(pytest.mark.skip(reason=f"{name}: not in SIGMA_FAST_TEST_BACKENDS"))
        elif not status[name].available:
            marks.append(pytest.mark.skip(reason=f"{name} backend unavailable: {status[name].reason}"))
        if name in ("cuda",):
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def device_for(backend: str) -> str:
    return "cuda" if backend == "cuda" or (backend == "triton" and _HAS_CUDA) else "cpu"


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: torch's thread pool only adds contention (seconds per step on a busy
    2-core machine). Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    from sigma_fast.testing import torch_threads

    with torch_threads(1):
        yield
