"""sigma_fast: SIGMA generative recommendation with semantic IDs, with a fast compiled core.

Ops (each with reference / cpu / cuda / triton backends, see ``backends()``):
    rq_encode, rq_decode, dedup_codes, ResidualQuantizer
    apf_fuse over an ItemIndex (adaptive probabilistic fusion)
    PrefixTrie + constrained_beam_step (trie-constrained beam search over semantic IDs)
"""

from ._backends import BackendStatus, backends, build_info
from .apf import apf_fuse
from .beam import BeamStep, constrained_beam_step
from .index import ItemIndex
from .quantizer import ResidualQuantizer
from .rq import rq_decode, rq_encode, dedup_codes
from .trie import PrefixTrie

__version__ = "0.1.0"


def set_num_threads(n: int) -> None:
    """Threads used by the C++ backend (0 = all hardware threads; default, or the
    SIGMA_FAST_NUM_THREADS environment variable)."""
    from ._backends import require_backend

    require_backend("cpu").set_num_threads(int(n))


def get_num_threads() -> int:
    from ._backends import require_backend

    return int(require_backend("cpu").get_num_threads())


__all__ = [
    "BackendStatus",
    "BeamStep",
    "ItemIndex",
    "PrefixTrie",
    "ResidualQuantizer",
    "apf_fuse",
    "backends",
    "build_info",
    "constrained_beam_step",
    "dedup_codes",
    "get_num_threads",
    "rq_decode",
    "rq_encode",
    "set_num_threads",
]
