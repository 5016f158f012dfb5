"""What a search is made of once it ran: the result object and which trials count toward the budget."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from lightning_opt.search._spec import SearchConfig

__all__ = ["SearchResult", "counted_trials"]


@dataclass
class SearchResult:
    """What a finished search returns.

    Args:
        study: The optuna study (all workers' trials).
        config: The validated ``search:`` section.
        best_trials: The best trial (one objective) or the Pareto front (several), completed trials only.
        best_configs: The written ``best*.yaml`` files, in the order of ``best_trials``.
        files: Other outputs by name (``csv``, ``history_png``, ``pareto_png``, ``tensorboard``).
    """

    study: optuna.Study
    config: SearchConfig
    best_trials: list[optuna.trial.FrozenTrial] = field(default_factory=list)
    best_configs: list[Path] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


def _retried_numbers(trials: Sequence[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of trials failed by a dead worker's heartbeat and re-queued as a new trial."""
    retried: set[int] = set()
    for t in trials:
        retried.update(t.system_attrs.get("retry_history", []))
    return retried


def counted_trials(trials: Sequence[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The trials that count toward ``n_trials``: all but re-queued dead ones and those dropped over budget."""
    retried = _retried_numbers(trials)
    return [t for t in trials if t.number not in retried and not t.user_attrs.get("skipped")]
