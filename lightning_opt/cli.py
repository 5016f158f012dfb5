"""``lightning-opt``: LightningCLI with the project's defaults, a compression report on every run, and extra commands.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI's own; further subcommands (``report``, ``search``,
``export``) are registered in :data:`EXTRA_COMMANDS` as ``"module:function"`` entries whose function takes the
remaining command-line arguments.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_opt._io import check_trainer_output_dirs, use_atomic_checkpoints
from lightning_opt._utils import load_checkpoint, local_log_dir
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


#: Errors that mean the input (recipe, override, checkpoint, output folder) is wrong: one message, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    KeyError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    MisconfigurationException,
)


def debug_enabled(argv: Sequence[str] = ()) -> bool:
    """Whether tracebacks are wanted: ``--debug`` on the command line or ``LIGHTNING_OPT_DEBUG=1``."""
    return "--debug" in argv or os.environ.get("LIGHTNING_OPT_DEBUG", "") not in ("", "0", "false")


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` reports bad input rather than a bug: a :data:`USER_ERRORS` type, a quantization refusal, or a
    checkpoint whose tensors do not fit the model."""
    if isinstance(err, USER_ERRORS):
        return True
    name = type(err).__name__
    return name == "QuantizationExportError" or str(err).startswith("Error(s) in loading state_dict")


def error_message(err: BaseException) -> str:
    """The message of a user error, without the quotes ``KeyError`` adds."""
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]
    return str(err) or type(err).__name__


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
    """Condense jsonargparse's "does not validate against any of the Union subtypes" report to its one relevant item.

    The report lists one item per type of the union it tried; the item that names the user's own class or our own
    validation message (backticks, a HINT) is kept with the key, the rest (``Expected a <class 'NoneType'>``, the
    generic base class) is dropped.

    Example:
        >>> report = "\\n".join([
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

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:  # type: ignore[override]
        hint = self._suggest(message)
        if not self.exit_on_error or debug_enabled():  # jsonargparse probing a type, or a traceback was asked for
            super().error(message + hint, ex)  # type: ignore[call-arg]
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
            parser.error(f"invalid configuration: {concise_message(str(err))}")

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """The recipe's trainer, writing its checkpoints atomically (:class:`lightning_opt._io.AtomicCheckpointIO`)."""
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


def check_recipe_file(path: str) -> None:
    """Fail with the file, line and column when a recipe is missing, not a file, or not valid YAML.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if it is a folder or its YAML does not parse.
    """
    import yaml

    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(
            f"recipe {path!r} does not exist. HINT: recipes live under recipes/, e.g. recipes/quickstart.yaml."
        )
    if not file.is_file():
        raise ValueError(f"recipe {path!r} is not a file.")
    try:
        content = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"recipe {path!r} is not valid YAML{where}: {problem}.") from None
    if content is not None and not isinstance(content, dict):
        raise ValueError(
            f"recipe {path!r} must hold a mapping of keys (model:, data:, trainer:...), got a {type(content).__name__}."
        )


def _option_values(args: Sequence[str], option: str) -> list[str]:
    """The values given to ``option`` on a command line (``--opt value`` and ``--opt=value``)."""
    values = []
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith(option + "="):
            values.append(arg.split("=", 1)[1])
    return values


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-opt`` console script; returns the exit code.

    Bad input of any kind (an unknown key, a wrong value, a missing or unreadable checkpoint, an unwritable folder, a
    technique that refuses the model at setup) ends with one message on stderr and exit code 2 (``SystemExit(2)``),
    without a traceback (``--debug`` or ``LIGHTNING_OPT_DEBUG=1`` shows it); a run that fails before its first
    training step leaves no run folder behind.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(args)
    args = [a for a in args if a != "--debug"]
    LightningOptCLI.active = None
    try:
        for config_path in _option_values(args, "--config") + _option_values(args, "-c"):
            check_recipe_file(config_path)
        for ckpt_path in _option_values(args, "--ckpt_path") + _option_values(args, "--ckpt"):
            if ckpt_path not in ("last", "best", "hpc", "registry"):
                load_checkpoint(ckpt_path)  # LightningCLI reads it while parsing: check it first, with a clear error
        if args and args[0] in EXTRA_COMMANDS:
            module_name, _, function_name = EXTRA_COMMANDS[args[0]].partition(":")
            function = getattr(importlib.import_module(module_name), function_name)
            function(args[1:])
            return 0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
            LightningOptCLI(args=args)
        return 0
    except Exception as err:
        if debug or not is_user_error(err):
            raise
        command = f"lightning-opt {args[0]}" if args and not args[0].startswith("-") else "lightning-opt"
        cli = LightningOptCLI.active
        trained = cli is not None and getattr(cli, "trainer", None) is not None and cli.trainer.global_step > 0
        removed = None if trained or cli is None else cli.remove_new_run_dir()
        message = error_message(err)
        sys.stderr.write(f"{command}: error: {message}\n")
        if removed:
            sys.stderr.write(f"(nothing was trained; removed the run folder {removed})\n")
        sys.stderr.write("Run with --debug (or LIGHTNING_OPT_DEBUG=1) for the traceback.\n")
        raise SystemExit(2) from None
    finally:
        LightningOptCLI.active = None


if __name__ == "__main__":
    sys.exit(main())
