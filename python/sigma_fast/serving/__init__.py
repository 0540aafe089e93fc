"""The serving layer (DESIGN.md §7): a static-shape generation engine for trained SIGMA models
(``Engine``), above the ops library and the SIGMA application."""

from .engine import Engine, EngineStats

__all__ = ["Engine", "EngineStats"]
