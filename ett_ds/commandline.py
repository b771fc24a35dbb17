"""What every command line of the project shares: help that shows defaults, and argparse errors as one line.

A leaf (imports only the standard library), so that ``ett_ds``'s commands and ``data_tools`` use one formatter and
one parser without importing each other's command modules.
"""
from __future__ import annotations

import argparse


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
    """An ``ArgumentParser`` whose errors raise ``error_class("PROG: message")`` (the caller prints one line and exits
    2) instead of printing the whole usage; ``--help`` shows defaults (:class:`DefaultsHelpFormatter`)."""

    error_class: type[Exception] = ValueError

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise self.error_class(f"{self.prog}: {message}")
