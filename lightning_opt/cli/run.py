"""``lightning-opt fit|validate|test|predict --config RECIPE``: LightningCLI's commands with the project's defaults.

See `lightning_opt.recipe.LightningOptCLI` for what the recipe layer adds (TensorBoard by default, the
compression report, ``--test_after_fit``, the list of written files at the end of ``fit``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from lightning_opt._errors import is_user_error
from lightning_opt._utils import load_checkpoint
from lightning_opt.recipe import LightningOptCLI, load_recipe

__all__ = ["main"]

_CHECKPOINT_ALIASES = ("last", "best", "hpc", "registry")


def _option_values(args: Sequence[str], *options: str) -> list[str]:
    """The values given to ``options`` on a command line (``--opt value`` and ``--opt=value``)."""
    values = []
    for i, arg in enumerate(args):
        for option in options:
            if arg == option and i + 1 < len(args):
                values.append(args[i + 1])
            elif arg.startswith(option + "="):
                values.append(arg.split("=", 1)[1])
    return values


def main(argv: Sequence[str]) -> int:
    """Run LightningCLI's subcommand ``argv[0]`` (``fit``, ``validate``, ``test``, ``predict``) on a recipe.

    The recipe files and the checkpoint are checked first (a clear error naming the file, line and column); a run
    that fails before its first training step leaves no run folder behind.

    Args:
        argv: The subcommand and its arguments, ``["fit", "--config", "recipe.yaml", "--trainer.max_epochs=2"]``.

    Returns:
        0.
    """
    args = list(argv)
    for config_path in _option_values(args, "--config", "-c"):
        load_recipe(config_path)
    for ckpt_path in _option_values(args, "--ckpt_path"):
        if ckpt_path not in _CHECKPOINT_ALIASES:
            load_checkpoint(ckpt_path)  # LightningCLI reads it while parsing: check it first, with a clear error
    LightningOptCLI.active = None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
            LightningOptCLI(args=args)
        return 0
    except Exception as err:
        cli = LightningOptCLI.active
        trained = cli is not None and getattr(cli, "trainer", None) is not None and cli.trainer.global_step > 0
        if is_user_error(err) and cli is not None and not trained:
            removed = cli.remove_new_run_dir()
            if removed is not None:
                err.add_note(f"(nothing was trained; removed the run folder {removed})")
        raise
    finally:
        LightningOptCLI.active = None
