"""Plain NumPy reference implementations of every op.

They are the specification the compiled backends are tested against: same signatures as the
public ops, float32 storage where the kernels store float32, and the same tie rules, so
integer outputs can be compared exactly.
"""

from .rq import rq_decode, rq_encode

__all__ = ["rq_encode", "rq_decode"]
