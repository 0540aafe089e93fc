"""The serving layer (DESIGN.md §7) above the SIGMA application: the backend a front end
calls (``load_backend``, ``load_served``), micro-batching with back-pressure (``MicroBatcher``),
the HTTP server (``sigma_fast.serving.http``, needs the ``[serve]`` extra) and batch-offline
recommendations for every user (``recommend_all``, sharded under torchrun).

>>> from sigma_fast.serving import MicroBatcher, load_served, recommend_all
"""

from .backend import Backend, Served, load_backend, load_served, run_settings
from .batching import MicroBatcher, NotAccepting, QueueFull
from .offline import recommend_all

__all__ = ["Backend", "MicroBatcher", "NotAccepting", "QueueFull", "Served", "load_backend",
           "load_served", "recommend_all", "run_settings"]
