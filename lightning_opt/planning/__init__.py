"""Planning a compression recipe before training: its timeline, each layer's sensitivity, a budgeted per-layer plan.

The ``lightning-opt plan`` command (:func:`lightning_opt.planning.main`) runs the three on a recipe; the functions
below are its library.
"""

from __future__ import annotations

from lightning_opt.planning._recipe import Recipe, build_recipe, read_recipe_file
from lightning_opt.planning._timeline import (
    Conflict,
    Event,
    RunLength,
    Timeline,
    nm_conflicts,
    recipe_timeline,
    run_length,
)

__all__ = [
    "Conflict",
    "Event",
    "Recipe",
    "RunLength",
    "Timeline",
    "build_recipe",
    "nm_conflicts",
    "read_recipe_file",
    "recipe_timeline",
    "run_length",
]
