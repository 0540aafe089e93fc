"""Triton backend: the same ops as ``sigma_fast.reference``, as Triton kernels.

Runs on a CUDA device, or on the CPU interpreter when ``TRITON_INTERPRET=1`` is set before
triton is imported (for testing). Loaded lazily through ``sigma_fast._backends.load_triton``.
"""

from . import apf, beam_step, rq

__all__ = ["apf", "beam_step", "rq"]
