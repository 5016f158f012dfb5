"""Reading a recipe for the planner: build it without running it, find its callbacks and their config keys.

The one place in this package that imports the recipe builder (`lightning_opt.recipe.build_from_config`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer

__all__ = ["Recipe", "build_recipe", "read_recipe_file"]


@dataclass
class Recipe:
    """A recipe built the way ``lightning-opt fit`` builds it, without training.

    Args:
        files: the recipe files (``--config``), in order.
        overrides: the command-line overrides given after them (``--trainer.max_epochs=5``).
        model: the LightningModule.
        datamodule: the LightningDataModule (or None).
        trainer: the Trainer.
        callback_keys: ``{id(callback): "trainer.callbacks[i]"}`` for the callbacks the recipe lists.
    """

    files: list[str]
    overrides: list[str]
    model: LightningModule
    datamodule: LightningDataModule | None
    trainer: Trainer
    callback_keys: dict[int, str] = field(default_factory=dict)

    def key_of(self, callback: Callback) -> str:
        """The config key of a callback the recipe lists (``trainer.callbacks[1]``), or its class name."""
        return self.callback_keys.get(id(callback), f"trainer.callbacks<{type(callback).__name__}>")

    def callbacks(self, kind: type | tuple[type, ...]) -> list[Any]:
        """The Trainer's callbacks of a type, in the Trainer's order."""
        return [c for c in self.trainer.callbacks if isinstance(c, kind)]  # type: ignore[attr-defined]


def read_recipe_file(path: str) -> dict[str, Any]:
    """The recipe file as a plain mapping (what a plan copies and fills in).

    Raises:
        FileNotFoundError: if it does not exist.
        ValueError: if it is not a YAML mapping.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"recipe {path!r} does not exist or is not a file. HINT: recipes live under recipes/, e.g. "
            "recipes/pruning/gmp_digits.yaml."
        )
    try:
        content = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"recipe {path!r} is not valid YAML: {str(err).splitlines()[0]}.") from None
    if not isinstance(content, dict):
        raise ValueError(f"recipe {path!r} must hold a mapping of keys (model:, data:, trainer:...).")
    return content


def build_recipe(files: Sequence[str], overrides: Sequence[str] = (), quiet: bool = True) -> Recipe:
    """Build model, datamodule and Trainer from recipe files exactly as ``lightning-opt fit`` validates them.

    Args:
        files: recipe files (``--config``), merged in order.
        overrides: command-line overrides (``--trainer.max_epochs=5``).
        quiet: no logger, progress bar or model summary (the planner writes its own outputs).

    Returns:
        The built `Recipe`.

    Raises:
        FileNotFoundError: if a recipe file is missing.
        ValueError: if the recipe does not build (the message is the CLI's one-line message).
    """
    from lightning_opt.recipe import build_from_config, concise_message

    for f in files:
        read_recipe_file(f)
    args: list[str] = []
    for f in files:
        args += ["--config", f]
    if quiet:
        args += [
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
    args += list(overrides)
    parser_kwargs = {"exit_on_error": False}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cli = build_from_config(args, save_config_callback=None, parser_kwargs=parser_kwargs)
    except SystemExit as err:  # a usage error already printed by the CLI parser
        raise ValueError(f"the recipe {list(files)} does not build (see the message above).") from err
    except Exception as err:
        if type(err).__name__ == "ArgumentError" or "error" in type(err).__name__.lower():
            raise ValueError(
                f"the recipe {list(files)} does not build: {_first_line(concise_message(str(err)))}"
            ) from None
        raise
    listed = list((cli.config_init.get("trainer") or {}).get("callbacks") or [])
    configured = list((cli.config.get("trainer") or {}).get("callbacks") or [])
    keys = {id(cb): f"trainer.callbacks[{i}]" for i, cb in enumerate(listed[: len(configured)])}
    return Recipe(
        files=list(files),
        overrides=list(overrides),
        model=cli.model,
        datamodule=cli.datamodule,
        trainer=cli.trainer,
        callback_keys=keys,
    )


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else text
