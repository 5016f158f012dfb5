"""The recipe layer: `LightningOptCLI` (LightningCLI with the project's defaults) and building a run from a
recipe, the library that the commands (``fit``, ``search``, ``report``, ``export``, ``plan``) share.

A recipe is a LightningCLI config (``model``, ``data``, ``trainer``, ``report``...). `build_from_config` parses
and instantiates one without running it; `load_recipe` reads one the way LightningCLI does (the same YAML
reader, so ``1e-4`` is a float everywhere, ``search:`` and overrides included).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml
from jsonargparse import get_loader
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_opt._errors import debug_enabled
from lightning_opt._io import check_trainer_output_dirs, use_atomic_checkpoints
from lightning_opt._utils import load_checkpoint, local_log_dir
from lightning_opt.reporting import CompressionReport

__all__ = ["DEFAULT_LOGGER", "LightningOptCLI", "build_from_config", "load_recipe", "load_yaml"]

#: What ``lightning-opt fit --help`` says first.
DESCRIPTION = "Train a recipe (a LightningCLI config: model, data, trainer, callbacks, report) with lightning-opt."

DEFAULT_LOGGER = {
    "class_path": "lightning_opt.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "runs", "name": "lightning_opt"},
}
"""Where runs land unless a recipe names another logger: ``tensorboard --logdir runs``. The project's logger
(`lightning_opt.loggers.TensorBoardLogger`) logs no ``hp_metric = -1`` and no ``epoch`` scalar: the run's one
HParams session comes from the compression report when fit ends."""


def _union_bullets(lines: list[str]) -> list[list[str]]:
    """The "- ..." items of the first bullet level of a jsonargparse union report, each with its continuation lines."""
    bullets: list[list[str]] = []
    indent: int | None = None
    for line in lines:
        stripped = line.lstrip()
        if not stripped:
            continue
        depth = len(line) - len(stripped)
        if stripped.startswith("- ") and (indent is None or depth == indent):
            indent = depth
            bullets.append([stripped[2:]])
        elif bullets and indent is not None and depth > indent:
            bullets[-1].append(stripped)
        elif bullets and indent is not None and depth <= indent:
            break
    return bullets


def _score(bullet: list[str]) -> int:
    text = " ".join(bullet)
    if "`" in text or "HINT" in text:
        return 4  # the project's own validation message
    if re.search(r"class_path '(lightning\.Callback|lightning\.pytorch\.callbacks\.callback\.Callback)'", text):
        return 0  # the union's generic base class: never what the user meant
    if "Got value" in text or "has no attribute" in text or "not accessible" in text:
        return 3
    if "is not accepted" in text or "Problem with given class_path" in text:
        return 2
    if re.fullmatch(r"Expected a <class '[\w.]+'>", text.strip()) or "Not a valid subclass" in text:
        return 0
    return 1


def concise_message(message: str) -> str:
    r"""Condense jsonargparse's "does not validate against any of the Union subtypes" report to its one relevant item.

    The report lists one item per type of the union it tried; the item that names the user's own class or our own
    validation message (backticks, a HINT) is kept with the key, the rest (``Expected a <class 'NoneType'>``, the
    generic base class) is dropped.

    Examples:
        >>> report = "\n".join([
        ...     'Parser key "trainer.callbacks":',
        ...     "  Does not validate against any of the Union subtypes",
        ...     "  Errors:",
        ...     "    - Problem with given class_path 'my.Pruning':",
        ...     '        Parser key "granularity": Expected a Literal. Got value: block',
        ...     "    - Expected a <class 'NoneType'>",
        ...     "  Given value: block",
        ... ])
        >>> print(concise_message(report))  # doctest: +NORMALIZE_WHITESPACE
        Parser key "trainer.callbacks": Problem with given class_path 'my.Pruning':
        Parser key "granularity": Expected a Literal. Got value: block
    """
    if "Does not validate against any of" not in message:
        return message
    lines = message.splitlines()
    head = lines[0].strip() if not lines[0].lstrip().startswith("Does not validate") else ""
    bullets = _union_bullets(lines)
    best = max(bullets, key=_score, default=None)
    if best is None or _score(best) == 0:
        expected = re.findall(r"Expected a <class '([\w.]+)'>", message)
        given = re.search(r"Given value: (.*)", message)
        detail = f"expected {' or '.join(dict.fromkeys(expected))}" if expected else "invalid value"
        if given:
            detail += f", got {given.group(1).strip()}"
        return f"{head} {detail}".strip()
    if any(part.startswith("Does not validate against any of") for part in best[1:]):  # a union inside the item
        return concise_message("\n".join([f"{head} {best[0]}".strip(), *("  " + part for part in best[1:])]))
    items = [part[2:] for part in best[1:] if part.startswith("- ")]  # a nested list of tried types: keep the best
    if items:
        best = [part for part in best if not part.startswith("- ")] + [max(items, key=lambda i: _score([i]))]
    nested = " ".join(part for part in best if part)
    nested = re.sub(r"^Problem with given class_path '[^']+':\s*(`)", r"\1", nested)  # our message names the key
    return f"{head} {nested}".strip() if "`" not in nested else nested


class SuggestingArgumentParser(LightningArgumentParser):
    """A LightningCLI parser whose errors for unknown keys name the key and suggest the closest valid ones.

    A usage error is one message on stderr (the key, what is wrong, the closest valid keys) and exit code 2, not the
    whole usage text; ``--help`` lists the keys. Keys are never abbreviated (``--trainer.max_epoch`` is an error, not
    ``max_epochs``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        hint = self._suggest(message)
        if not self.exit_on_error or debug_enabled():  # jsonargparse probing a type, or a traceback was asked for
            super().error(message + hint, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        text = concise_message(message.strip())
        sys.stderr.write(f"{prog}: error: {text}{hint}\nRun `{prog} --help` for the accepted keys.\n")
        raise SystemExit(2)

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
        unknown = re.findall(r"does not accept option '([^']+)'|[Kk]ey '([^']+)' is not expected", message)
        for given in re.findall(r"unrecognized arguments: (.+)", message):
            unknown += [(word.lstrip("-").split("=", 1)[0], "") for word in given.split() if word.startswith("--")]
        for key in dict.fromkeys(unknown):
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
    """LightningCLI with TensorBoard as the default logger, a `CompressionReport` under the ``report`` key,
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
        kwargs.setdefault("parser_kwargs", {"description": DESCRIPTION})
        kwargs.setdefault("parser_class", SuggestingArgumentParser)
        super().__init__(*args, **kwargs)

    def instantiate_classes(self) -> None:
        """Build model, data, callbacks and trainer; bad input is reported as a usage error before training starts."""
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError, TypeError) as err:
            parser = self._parser(self.subcommand)
            parser.error(f"invalid configuration: {concise_message(str(err))}")

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The recipe's trainer, writing its checkpoints atomically (`lightning_opt._io.AtomicCheckpointIO`)."""
        return use_atomic_checkpoints(super().instantiate_trainer(**kwargs))

    #: The CLI whose subcommand is running (its run folder is removed when it fails before training).
    active: LightningOptCLI | None = None

    def _enter_run(self) -> None:
        """Note the run folder this run will create, and check the checkpoint to resume from, before anything runs."""
        LightningOptCLI.active = self
        run_dir = Path(local_log_dir(self.trainer)).resolve()
        self.new_dirs = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
        check_trainer_output_dirs(self.trainer)  # an unwritable folder fails now, naming its key, not after an epoch
        config = self.config[self.subcommand] if self.subcommand else self.config
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            load_checkpoint(ckpt_path)  # missing, truncated, not weights-only, not a checkpoint: one clear error

    def remove_new_run_dir(self) -> Path | None:
        """Delete the outermost folder this run created (called when it failed before its first training step)."""
        created = [p for p in getattr(self, "new_dirs", []) if p.exists()]
        if not created:
            return None
        shutil.rmtree(created[-1], ignore_errors=True)
        return created[-1]

    def before_fit(self) -> None:
        self._enter_run()

    def before_validate(self) -> None:
        self._enter_run()

    def before_test(self) -> None:
        self._enter_run()

    def before_predict(self) -> None:
        self._enter_run()

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
        has_test = type(self.datamodule).test_dataloader is not LightningDataModule.test_dataloader
        if config.get("test_after_fit", True) and not self.trainer.interrupted and has_test:
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=True)
        if self.trainer.is_global_zero:
            print(format_written_files(written_files(self.trainer)))


def written_files(trainer: Trainer) -> dict[str, str]:
    """What a run wrote, by what it holds: its checkpoints, the recipe as run, the TensorBoard folder and every file
    a callback lists in its ``artifacts`` (the report, the pruned model, the int8 artifact, the student).
    """
    files: dict[str, str] = {}
    run_dir = Path(local_log_dir(trainer))
    if trainer.loggers:
        files["TensorBoard run" if isinstance(trainer.logger, TensorBoardLogger) else "logs"] = str(run_dir)
    if (run_dir / "config.yaml").is_file():
        files["recipe as run"] = str(run_dir / "config.yaml")
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            if callback.best_model_path and callback.monitor:
                files[f"best checkpoint ({callback.monitor})"] = callback.best_model_path
            if callback.last_model_path:
                files["last checkpoint"] = callback.last_model_path
            elif callback.best_model_path and not callback.monitor:
                files["checkpoint"] = callback.best_model_path
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        files.update(getattr(callback, "artifacts", None) or {})
    return {name: path for name, path in files.items() if Path(path).exists()}


def format_written_files(files: dict[str, str]) -> str:
    """The lines ``lightning-opt fit`` ends with: each written file, relative to the working folder when inside it.

    Examples:
        >>> print(format_written_files({"report": "runs/a/version_0/report.md"}))
        Written by this run:
          report  runs/a/version_0/report.md
    """
    if not files:
        return "Nothing was written by this run (no logger, no checkpoint)."
    width = max(map(len, files))
    cwd = Path.cwd().resolve()
    lines = ["Written by this run:"]
    for name, path in files.items():
        resolved = Path(path).resolve()
        shown = resolved.relative_to(cwd) if resolved.is_relative_to(cwd) else resolved
        lines.append(f"  {name:<{width}}  {shown}")
    return "\n".join(lines)


def build_from_config(args: Sequence[str] | dict[str, Any], **kwargs: Any) -> LightningOptCLI:
    """Parse and instantiate a recipe without running anything: ``.model``, ``.datamodule`` and ``.trainer`` are built
    and validated exactly as ``lightning-opt fit`` validates them.

    Args:
        args: Command-line strings (``["--config", "recipe.yaml", "--trainer.max_steps=2"]``) or a config dict.
        **kwargs: Passed to `LightningOptCLI`.

    Examples:
        >>> cli = build_from_config({"model": {"class_path": "lightning_opt.module.ImageClassifier"},
        ...                          "data": {"class_path": "lightning_opt.data.DigitsDataModule"},
        ...                          "trainer": {"logger": False, "enable_progress_bar": False}})
        >>> type(cli.model).__name__
        'ImageClassifier'
    """
    with warnings.catch_warnings():  # the args are ours, not a mix-up with sys.argv (subcommands pass them)
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
        return LightningOptCLI(args=args if isinstance(args, dict) else list(args), run=False, **kwargs)


def load_yaml(text: str) -> Any:
    r"""Read YAML as LightningCLI reads recipes (jsonargparse's loader: YAML 1.2 numbers, so ``1e-4`` is a float).

    Every part of a recipe goes through this one reader: the LightningCLI keys, the ``search:`` section and
    ``--key=value`` overrides.

    Examples:
        >>> load_yaml("lr: 1e-4\nsizes: [4, 8]")
        {'lr': 0.0001, 'sizes': [4, 8]}
    """
    return get_loader("yaml")(text)


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe file, failing with the file, line and column when it is missing, not a file, or not valid YAML.

    Returns:
        The recipe as a dict (empty for an empty file).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if it is a folder, its YAML does not parse, or it does not hold a mapping.
    """
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(
            f"recipe {str(path)!r} does not exist. HINT: recipes live under recipes/, e.g. recipes/quickstart.yaml."
        )
    if not file.is_file():
        raise ValueError(f"recipe {str(path)!r} is not a file.")
    try:
        content = load_yaml(file.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"recipe {str(path)!r} is not valid YAML{where}: {problem}.") from None
    if content is not None and not isinstance(content, dict):
        raise ValueError(
            f"recipe {str(path)!r} must hold a mapping of keys (model:, data:, trainer:...), got a"
            f" {type(content).__name__}."
        )
    return content or {}
