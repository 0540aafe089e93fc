"""sigma_fast: SIGMA generative recommendation with semantic IDs, with a fast compiled core.

The ops library (this package; every op has reference / cpu / cuda / triton backends, see
``backends()``):

    rq_encode, rq_decode, dedup_codes, ResidualQuantizer       residual quantization (semantic IDs)
    PrefixTrie, constrained_beam_step, BeamStep                trie-constrained beam search
    ItemIndex, apf_fuse                                        adaptive probabilistic fusion
    SIDVocab, constrained_beam_search, SearchResult,           generation with Hugging Face LMs
    SIDConstrainedLogitsProcessor, check_generation_config

Above it (imports only go down): ``sigma_fast.rec`` (the SIGMA application: data, grounding,
hybrid tokenization, model, SFT, three-step generation, evaluation, the pipeline),
``sigma_fast.serving`` (serving engine and front ends) and ``sigma_fast.apps`` (the
``sigma-fast`` command line).
"""

from ._compat import check_torch as _check_torch

_check_torch()  # names the torch version needed before the op modules register custom ops

from ._backends import BackendStatus, backends, build_info  # noqa: E402
from ._version import __version__  # noqa: E402
from .apf import apf_fuse  # noqa: E402
from .beam_step import BeamStep, constrained_beam_step  # noqa: E402
from .item_index import ItemIndex  # noqa: E402
from .quantizer import ResidualQuantizer  # noqa: E402
from .rq import dedup_codes, rq_decode, rq_encode  # noqa: E402
from .sid_vocab import SIDVocab  # noqa: E402
from .trie import PrefixTrie  # noqa: E402


MAX_THREADS = 1024  # the C++ pool starts one OS thread per worker


def set_num_threads(n: int) -> None:
    """Threads used by the C++ backend: an int in [0, 1024] (0 = all hardware threads; default,
    or the SIGMA_FAST_NUM_THREADS environment variable). An explicit count also stops the
    training and generation loops from adapting thread counts to the free CPUs
    (``sigma_fast._threads``)."""
    from . import _threads
    from ._backends import require_backend
    from ._checks import check_int

    n = check_int(n, "n (the number of threads)", 0)
    if n > MAX_THREADS:
        raise ValueError(f"n (the number of threads) must be <= {MAX_THREADS}; got {n}")
    require_backend("cpu").set_num_threads(n)
    _threads.pin()


def get_num_threads() -> int:
    from ._backends import require_backend

    return int(require_backend("cpu").get_num_threads())


# The Hugging Face adaptors are imported on first use: they are heavier than the ops.
_LAZY = {"SearchResult": ".search", "constrained_beam_search": ".search",
         "SIDConstrainedLogitsProcessor": ".logits_processor",
         "check_generation_config": ".logits_processor"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sigma_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BackendStatus",
    "BeamStep",
    "ItemIndex",
    "PrefixTrie",
    "ResidualQuantizer",
    "SIDConstrainedLogitsProcessor",
    "SIDVocab",
    "SearchResult",
    "__version__",
    "apf_fuse",
    "backends",
    "build_info",
    "check_generation_config",
    "constrained_beam_search",
    "constrained_beam_step",
    "dedup_codes",
    "get_num_threads",
    "rq_decode",
    "rq_encode",
    "set_num_threads",
]
