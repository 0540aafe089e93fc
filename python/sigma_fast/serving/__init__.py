"""The serving layer (DESIGN.md §7) above the SIGMA application: a static-shape generation
engine for trained SIGMA models (``Engine``); the backend a front end calls (``load_backend``,
``load_served``); micro-batching with back-pressure (``MicroBatcher``); the HTTP server
(``sigma_fast.serving.http``, needs the ``[serve]`` extra) and batch-offline recommendations for
every user (``recommend_all``, sharded under torchrun).

>>> from sigma_fast.serving import Engine, MicroBatcher, load_served, recommend_all
"""

from .backend import Backend, Served, load_backend, load_served, run_settings
from .batching import MicroBatcher, NotAccepting, QueueFull
from .engine import Engine, EngineStats
from .offline import recommend_all

__all__ = ["Backend", "Engine", "EngineStats", "MicroBatcher", "NotAccepting", "QueueFull",
           "Served", "load_backend", "load_served", "recommend_all", "run_settings"]
