"""How bad input is reported: which exceptions are the user's, their one-line message, the debug switch.

Imports nothing heavy (no torch, no Lightning), so the command line decides what to load only after reading its
arguments, and ``lightning-opt --help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

__all__ = ["ConciseArgumentParser", "debug_enabled", "error_message", "is_user_error"]

#: Exception types that mean the input (recipe, override, checkpoint, output folder) is wrong, by class name so that
#: checking an error needs no import of the library that raised it.
USER_ERROR_NAMES = frozenset(
    {
        "ValueError",
        "TypeError",
        "KeyError",
        "FileNotFoundError",
        "NotADirectoryError",
        "IsADirectoryError",
        "PermissionError",
        "MisconfigurationException",
        "QuantizationExportError",
    }
)


def debug_enabled(argv: Sequence[str] = ()) -> bool:
    """Whether tracebacks are wanted: ``--debug`` on the command line or ``LIGHTNING_OPT_DEBUG=1``.

    Examples:
        >>> debug_enabled(["fit", "--debug"])
        True
    """
    return "--debug" in argv or os.environ.get("LIGHTNING_OPT_DEBUG", "") not in ("", "0", "false")


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` reports bad input rather than a bug: a type named in `USER_ERROR_NAMES` (or a subclass
    of one), or a checkpoint whose tensors do not fit the model.

    Examples:
        >>> is_user_error(ValueError("`final` must be in [0, 1), got 1.5.")), is_user_error(ZeroDivisionError())
        (True, False)
    """
    if any(cls.__name__ in USER_ERROR_NAMES for cls in type(err).__mro__):
        return True
    return str(err).startswith("Error(s) in loading state_dict")


def error_message(err: BaseException) -> str:
    """The message of a user error, without the quotes ``KeyError`` adds, followed by any notes attached to it.

    Examples:
        >>> error_message(KeyError("`search.space`: key 'model.width' is not in the recipe."))
        "`search.space`: key 'model.width' is not in the recipe."
    """
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        message = err.args[0]
    else:
        message = str(err) or type(err).__name__
    return "\n".join([message, *getattr(err, "__notes__", [])])


class ConciseArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one message and a pointer to ``--help``, not the usage text.

    Examples:
        >>> parser = ConciseArgumentParser(prog="lightning-opt export")
        >>> _ = parser.add_argument("--batches", type=int)
        >>> parser.parse_args(["--batches", "x"])
        Traceback (most recent call last):
        ...
        SystemExit: 2
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\nRun `{self.prog} --help` for the accepted options.\n")
        raise SystemExit(2)
