"""``lightning-opt search --config recipe.yaml``: run or resume the search a recipe's ``search:`` section describes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console

from lightning_opt._errors import ConciseArgumentParser

__all__ = ["main"]

_EPILOG = """\
Any other `--key=value` is an override of the recipe, e.g. `--trainer.max_epochs=3` or `--search.n_trials=50`
(it is applied to every trial and written into the best*.yaml files).

Scale out: start the same command in several processes or on several machines with
`--search.storage=postgresql://user:password@host:5432/db`: they share one study and together run n_trials.
Rerunning a command resumes its study up to n_trials.
"""


def main(argv: Sequence[str]) -> int:
    """Entry point of ``lightning-opt search``.

    Args:
        argv: Command-line arguments after ``search``.

    Returns:
        0 when the search finished with at least one completed trial, 1 when none completed.

    Raises:
        ValueError: On bad input (nothing was run): the recipe, its ``search:`` section, an override, the storage.

    Examples:
        >>> main(["--config", "recipes/search/hpo_digits.yaml", "--search.n_trials=2"])  # doctest: +SKIP
        0
    """
    parser = ConciseArgumentParser(
        prog="lightning-opt search",
        description="Search architectures, hyperparameters and compression settings of a recipe with optuna.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", "-c", required=True, help="recipe YAML with a `search:` section")
    parser.add_argument("--verbose", "-v", action="store_true", help="show each trial's Lightning output")
    args, overrides = parser.parse_known_args(list(argv))

    from lightning_opt.search import run_search

    result = run_search(args.config, overrides, verbose=args.verbose, console=Console(file=sys.stdout))
    return 0 if result.best_trials else 1
