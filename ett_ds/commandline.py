"""What every command line of the project shares: the user-error base class, the runner that turns it into one
line and exit code 2, help that shows defaults, and argparse errors as one line.

A leaf (imports only the standard library), so that ``ett_ds``'s commands and ``data_tools`` use one error class,
one runner, one formatter and one parser without importing each other's command modules.

Every command's ``main(argv)`` is ``return run_cli(_main, argv)``: ``_main`` raises; the runner prints
``error: <one line>`` on stderr and returns 2 for a :class:`UserError` (the error classes of the config, the
checkpoints, the data and the CLIs derive from it) and for ``FileNotFoundError`` (a missing input the user named:
the library raises it from many places, shard lists, recipe files, checkpoint folders, so it is listed here rather
than wrapped). ``ETT_DEBUG=1`` re-raises instead (the traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

DEBUG_ENV = "ETT_DEBUG"  # =1: an expected error is re-raised with its traceback instead of printed as one line
USAGE_EXIT = 2  # a user error: bad argument, bad config, missing or unusable input


class UserError(Exception):
    """The user can fix it: printed as one line (``error: ...``), exit code 2, no traceback.

    The base of every error a command reports this way (``ConfigError``, ``CheckpointError``, ``ResumeError``,
    ``DataErrorRateExceeded``, the CLIs' ``CLIError``, ``EvalError``, ``UsageError`` ...); each keeps its own name
    (and its older base, e.g. ``ValueError``) so callers that catch it by name still do."""


def one_line(e: BaseException) -> str:
    """An expected error as one line: its message's first line. A DataLoader worker's error arrives wrapped ("Caught
    X in DataLoader worker process 0." + the worker's traceback): its last line, without the exception's module
    path, is the message."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    if not lines:
        return type(e).__name__
    if len(lines) > 1 and lines[0].startswith("Caught "):
        name, sep, msg = lines[-1].partition(": ")
        return msg if sep and "." in name and " " not in name else lines[-1]
    return lines[0]


def run_cli(main_fn: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, *,
            also: tuple[type[BaseException], ...] = (), hint: str = "",
            on_error: Callable[[BaseException], None] | None = None) -> int:
    """``main_fn(argv)`` (``sys.argv[1:]`` when None) -> its exit code (None: 0). A :class:`UserError`, a
    ``FileNotFoundError`` or one of ``also`` becomes ``error: <one line><hint>`` on stderr and exit code 2, after
    ``on_error(e)`` (e.g. close a progress bar, remove a half-written folder); with ``ETT_DEBUG=1`` it is re-raised.
    Anything else (a bug) keeps its traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        code = main_fn(argv)
    except (UserError, FileNotFoundError, *also) as e:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        if on_error is not None:
            on_error(e)
        print(f"error: {one_line(e)}{hint}", file=sys.stderr)
        return USAGE_EXIT
    return 0 if code is None else code


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written; an option's default is appended as ``(default: X)`` unless it is None or False
    (required options, flags) or its help already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if (action.option_strings and d is not None and d is not False and d is not argparse.SUPPRESS
                and "default" not in text):
            text = f"{text} (default: %(default)s)".lstrip()
        return text


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise ``error_class("PROG: message")`` (:func:`run_cli` prints one line and
    returns 2) instead of printing the whole usage; ``--help`` shows defaults (:class:`DefaultsHelpFormatter`)."""

    error_class: type[Exception] = UserError

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise self.error_class(f"{self.prog}: {message}")
