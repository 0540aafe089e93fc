"""sigma_fast: SIGMA generative recommendation with semantic IDs, with a fast compiled core.

Ops (each with reference / cpu / cuda / triton backends, see ``backends()``):
    rq_encode, rq_decode, dedup_codes, ResidualQuantizer
    apf_fuse over an ItemIndex (adaptive probabilistic fusion)
    PrefixTrie + constrained_beam_step (trie-constrained beam search over semantic IDs)

Pipeline (imported on first use):
    grounding: views, BPR teacher, L_CL + λ·L_KD, GroundingModel / train_grounding, recall_at_k
    tokenization: HybridItemTokenizer (SID prefix tokens + Proj&Fuse unique item embedding)
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


_LAZY = {name: ".search" for name in ("SIDConstrainedLogitsProcessor", "SIDVocab",
                                      "SearchResult", "check_generation_config",
                                      "constrained_beam_search")}
_LAZY.update({name: ".grounding" for name in (
    "GroundingModel", "Pairs", "agreement_report", "attribute_pairs", "co_interaction_pairs",
    "grounding_loss", "info_nce_loss", "kd_loss", "merge_views", "neighbour_pairs",
    "recall_at_k", "train_bpr", "train_grounding")})
_LAZY.update({name: ".tokenization" for name in (
    "HybridItemTokenizer", "ProjFuse", "default_codebook_size")})


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
    "GroundingModel",
    "HybridItemTokenizer",
    "ItemIndex",
    "Pairs",
    "PrefixTrie",
    "ProjFuse",
    "ResidualQuantizer",
    "SIDConstrainedLogitsProcessor",
    "SIDVocab",
    "SearchResult",
    "agreement_report",
    "apf_fuse",
    "attribute_pairs",
    "backends",
    "build_info",
    "check_generation_config",
    "co_interaction_pairs",
    "constrained_beam_search",
    "constrained_beam_step",
    "dedup_codes",
    "default_codebook_size",
    "get_num_threads",
    "grounding_loss",
    "info_nce_loss",
    "kd_loss",
    "merge_views",
    "neighbour_pairs",
    "recall_at_k",
    "rq_decode",
    "rq_encode",
    "set_num_threads",
    "train_bpr",
    "train_grounding",
]
