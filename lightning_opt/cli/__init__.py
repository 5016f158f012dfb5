"""``lightning-opt``: the commands, on top of the library (nothing in ``lightning_opt`` imports this package).

Each command is a module here with ``main(argv: list[str]) -> int``: ``fit``, ``validate``, ``test`` and ``predict``
(`lightning_opt.cli.run`, LightningCLI), ``search``, ``report``, ``export`` and ``plan``. This module reads only
the command name before importing anything heavy, so ``lightning-opt --help`` and a mistyped command answer at once.

Errors: bad input of any kind (an unknown key, a wrong value, a missing or unreadable checkpoint, an unwritable
folder, a technique that refuses the model at setup) ends with one message on stderr and exit code 2
(``SystemExit(2)``) without a traceback; ``--debug`` or ``LIGHTNING_OPT_DEBUG=1`` shows it.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Sequence

from lightning_opt._errors import debug_enabled, error_message, is_user_error

__all__ = ["COMMANDS", "main"]

COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("run", "train a recipe (then test it and write the compression report)"),
    "validate": ("run", "validate a recipe's model (from --ckpt_path)"),
    "test": ("run", "test a recipe's model (from --ckpt_path)"),
    "predict": ("run", "predict with a recipe's model (from --ckpt_path)"),
    "search": ("search", "search architectures, hyperparameters and compression settings (optuna)"),
    "plan": ("plan", "show a recipe's timeline; with --ckpt_path, scan layer sensitivity and plan per-layer settings"),
    "report": ("report", "measure a checkpoint: params, size, FLOPs, latency, test metric"),
    "export": ("export", "turn a checkpoint into a measured int8 .pt2 or ONNX artifact"),
}
"""Command name -> (module under ``lightning_opt.cli``, one-line summary for ``--help``)."""

_USAGE = "usage: lightning-opt [-h] [--version] {" + ",".join(COMMANDS) + "} ..."


def _help() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        _USAGE,
        "",
        "Train, compress, search and export Lightning models from recipe YAMLs.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()),
        "",
        "Run `lightning-opt COMMAND --help` for a command's options. Add --debug (or LIGHTNING_OPT_DEBUG=1) to see the",
        "traceback of an error. Example: lightning-opt fit --config recipes/quickstart.yaml",
    ]
    return "\n".join(lines)


def _usage_error(message: str) -> None:
    sys.stderr.write(f"{_USAGE}\nlightning-opt: error: {message}\nRun `lightning-opt --help` for the commands.\n")
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-opt`` console script: dispatch to the command's ``main``.

    Args:
        argv: The arguments after ``lightning-opt`` (default ``sys.argv[1:]``).

    Returns:
        The command's exit code (0 on success).

    Raises:
        SystemExit: With code 2 on bad input (one message on stderr), 0 after ``--help``.

    Examples:
        >>> main(["--version"])  # doctest: +ELLIPSIS
        lightning-opt ...
        0
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(args)
    args = [a for a in args if a != "--debug"]
    if not args or args[0] in ("-h", "--help"):
        print(_help())
        if not args:
            raise SystemExit(2)
        raise SystemExit(0)
    if args[0] == "--version":
        from lightning_opt import __version__

        print(f"lightning-opt {__version__}")
        return 0
    command = args[0]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f" HINT: did you mean {close[0]!r}?" if close else ""
        _usage_error(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}.{hint}")
    module = importlib.import_module(f"lightning_opt.cli.{COMMANDS[command][0]}")
    try:
        return int(module.main(args if COMMANDS[command][0] == "run" else args[1:]) or 0)
    except Exception as err:
        if debug or not is_user_error(err):
            raise
        sys.stderr.write(f"lightning-opt {command}: error: {error_message(err)}\n")
        sys.stderr.write("Run with --debug (or LIGHTNING_OPT_DEBUG=1) for the traceback.\n")
        raise SystemExit(2) from None
