"""Recipe-driven search over architectures, hyperparameters and compression settings (optuna inside).

A search is a normal recipe plus a ``search:`` section, run by ``lightning-opt search --config recipe.yaml``.
"""

from __future__ import annotations

from lightning_opt.search._callbacks import NonFiniteLossError, TrialCallback
from lightning_opt.search._outputs import pareto_front, write_outputs
from lightning_opt.search._results import SearchResult, counted_trials
from lightning_opt.search._runner import load_search_recipe, run_search
from lightning_opt.search._space import Param, SearchSpace, flatten_keys, get_path, set_path
from lightning_opt.search._spec import BUILTIN_OBJECTIVES, PRUNERS, SAMPLERS, Objective, SearchConfig

__all__ = [
    "BUILTIN_OBJECTIVES",
    "PRUNERS",
    "SAMPLERS",
    "NonFiniteLossError",
    "Objective",
    "Param",
    "SearchConfig",
    "SearchResult",
    "SearchSpace",
    "TrialCallback",
    "counted_trials",
    "flatten_keys",
    "get_path",
    "load_search_recipe",
    "pareto_front",
    "run_search",
    "set_path",
    "write_outputs",
]
