"""The one exception type the CLI turns into a one-line message and exit code 2 (no traceback), and the parser
that raises it."""

from ett_ds.commandline import OneLineParser, UserError


class UsageError(UserError):
    """A bad argument or a missing input: the user can fix it; a traceback would not help them."""


class Parser(OneLineParser):
    """data_tools' argument parser: a bad argument is a one-line :class:`UsageError` (exit 2), defaults in --help."""
    error_class = UsageError
