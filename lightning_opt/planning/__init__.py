"""Planning a compression recipe before training: its timeline, each layer's sensitivity, a budgeted per-layer plan.

The ``lightning-opt plan`` command (`lightning_opt.cli.plan`) runs the three on a recipe; the functions below are
its library.
"""

from __future__ import annotations

from lightning_opt.planning._allocate import allocate, fallback_layers, interpolate
from lightning_opt.planning._recipe import Recipe, build_recipe, read_recipe_file
from lightning_opt.planning._sensitivity import (
    DEFAULT_GRID,
    Evaluator,
    SensitivityScan,
    layer_flops,
    quantized,
    scan_sensitivity,
)
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
    "DEFAULT_GRID",
    "Conflict",
    "Evaluator",
    "Event",
    "Recipe",
    "RunLength",
    "SensitivityScan",
    "Timeline",
    "allocate",
    "build_recipe",
    "fallback_layers",
    "interpolate",
    "layer_flops",
    "nm_conflicts",
    "quantized",
    "read_recipe_file",
    "recipe_timeline",
    "run_length",
    "scan_sensitivity",
]
