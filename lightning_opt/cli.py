"""``lightning-opt``: LightningCLI with the project's defaults, a compression report on every run, and extra commands.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI's own; further subcommands (``report``, ``search``,
``export``) are registered in :data:`EXTRA_COMMANDS` as ``"module:function"`` entries whose function takes the
remaining command-line arguments.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_opt.reporting import CompressionReport

__all__ = ["EXTRA_COMMANDS", "LightningOptCLI", "build_from_config", "main"]

#: Subcommands beside LightningCLI's own: name -> "module:function"; the function takes ``argv: list[str]``.
EXTRA_COMMANDS: dict[str, str] = {
    "report": "lightning_opt.reporting._cli:main",
    "export": "lightning_opt.export:main",
    "search": "lightning_opt.search._cli:main",
}

#: Where runs land unless a recipe names another logger: ``tensorboard --logdir runs``.
DEFAULT_LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "runs", "name": "lightning_opt"},
}

_DESCRIPTION = (
    "lightning-opt: train, compress and search Lightning models from recipe YAMLs. Subcommands: fit, validate, test,"
    f" predict (LightningCLI), and {', '.join(EXTRA_COMMANDS)} (run `lightning-opt COMMAND --help`)."
)


class SuggestingArgumentParser(LightningArgumentParser):
    """A LightningCLI parser whose errors for unknown keys name the key and suggest the closest valid ones."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:  # type: ignore[override]
        hint = self._suggest(message)
        super().error(message + hint, ex)  # type: ignore[call-arg]

    def _valid_keys(self) -> list[str]:
        keys: list[str] = []
        parsers: list[LightningArgumentParser] = [self]
        while parsers:
            parser = parsers.pop()
            for action in parser._actions:
                choices = getattr(action, "choices", None)
                if isinstance(choices, dict):  # subcommands: their parsers hold the keys
                    parsers += [p for p in choices.values() if isinstance(p, LightningArgumentParser)]
                elif action.dest and action.dest not in ("help", "config", "print_config"):
                    keys.append(action.dest)
        return keys

    def _suggest(self, message: str) -> str:
        hints = []
        for key in dict.fromkeys(
            re.findall(r"does not accept option '([^']+)'|[Kk]ey '([^']+)' is not expected", message)
        ):
            name = next(k for k in key if k)
            close = difflib.get_close_matches(name, list(dict.fromkeys(self._valid_keys())), n=3, cutoff=0.6)
            hints.append(self._hint(name, close))
        class_paths = re.findall(r"Problem with given class_path '([^']+)'", message)
        for option in dict.fromkeys(re.findall(r"Option '([^']+)' is not accepted", message)):
            names: list[str] = []
            for class_path in class_paths:
                module_name, _, class_name = class_path.rpartition(".")
                try:
                    cls = getattr(importlib.import_module(module_name), class_name)
                    names += [n for n in inspect.signature(cls).parameters if n not in ("self", "args", "kwargs")]
                except (ImportError, AttributeError, ValueError, TypeError):
                    continue
            first = option.split(".")[0]
            if first in names:  # a parameter of one of the union's classes: its value is wrong, not its name
                continue
            hints.append(
                self._hint(first, difflib.get_close_matches(first, list(dict.fromkeys(names)), n=3, cutoff=0.6))
            )
        return "".join("\n" + h for h in hints if h)

    @staticmethod
    def _hint(name: str, close: list[str]) -> str:
        if close:
            return f"HINT: unknown key {name!r}; did you mean {', '.join(repr(c) for c in close)}?"
        return ""


class LightningOptCLI(LightningCLI):
    """LightningCLI with TensorBoard as the default logger, a :class:`CompressionReport` under the ``report`` key,
    and ``--test_after_fit`` (on by default) that tests the final model after ``fit``.

    Every model and datamodule is given by ``class_path``/``init_args``, so any LightningModule works.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", LightningModule)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("trainer_defaults", {"logger": DEFAULT_LOGGER})
        kwargs.setdefault("parser_kwargs", {"description": _DESCRIPTION})
        kwargs.setdefault("parser_class", SuggestingArgumentParser)
        super().__init__(*args, **kwargs)

    def instantiate_classes(self) -> None:
        """Build model, data, callbacks and trainer; bad input is reported as a usage error before training starts."""
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError, TypeError) as err:
            parser = self._parser(self.subcommand)
            parser.error(f"invalid configuration: {err}")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(CompressionReport, "report")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After `fit`, test the final model on the datamodule's test set (the report gets its test metric).",
        )

    def after_fit(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if not config.get("test_after_fit", True) or self.trainer.interrupted:
            return
        if type(self.datamodule).test_dataloader is LightningDataModule.test_dataloader:
            return
        self.trainer.test(self.model, datamodule=self.datamodule, verbose=True)


def build_from_config(args: Sequence[str] | dict[str, Any], **kwargs: Any) -> LightningOptCLI:
    """Parse and instantiate a recipe without running anything: ``.model``, ``.datamodule`` and ``.trainer`` are built
    and validated exactly as ``lightning-opt fit`` validates them.

    Args:
        args: Command-line strings (``["--config", "recipe.yaml", "--trainer.max_steps=2"]``) or a config dict.
        **kwargs: Passed to :class:`LightningOptCLI`.

    Example:
        >>> cli = build_from_config({"model": {"class_path": "lightning_opt.module.ImageClassifier"},
        ...                          "data": {"class_path": "lightning_opt.data.DigitsDataModule"},
        ...                          "trainer": {"logger": False, "enable_progress_bar": False}})
        >>> type(cli.model).__name__
        'ImageClassifier'
    """
    with warnings.catch_warnings():  # the args are ours, not a mix-up with sys.argv (subcommands pass them)
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
        return LightningOptCLI(args=args if isinstance(args, dict) else list(args), run=False, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-opt`` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in EXTRA_COMMANDS:
        module_name, _, function_name = EXTRA_COMMANDS[args[0]].partition(":")
        function = getattr(importlib.import_module(module_name), function_name)
        function(args[1:])
        return 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
        LightningOptCLI(args=None if argv is None else args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
