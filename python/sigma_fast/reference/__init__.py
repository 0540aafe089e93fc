"""Plain NumPy reference implementations of every op.

They are the specification the compiled backends are tested against: same signatures as the
public ops, float32 storage where the kernels store float32, and the same tie rules, so
integer outputs can be compared exactly.
"""

from .apf import apf_fuse
from .beam_step import constrained_beam_step
from .item_index import build_item_index
from .rq import rq_decode, rq_encode
from .trie import allowed_nodes, build_trie, trie_walk

__all__ = [
    "allowed_nodes",
    "apf_fuse",
    "build_item_index",
    "build_trie",
    "constrained_beam_step",
    "rq_decode",
    "rq_encode",
    "trie_walk",
]
