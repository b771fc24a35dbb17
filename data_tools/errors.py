"""The one exception type the CLI turns into a one-line message and exit code 2 (no traceback)."""


class UsageError(Exception):
    """A bad argument or a missing input: the user can fix it; a traceback would not help them."""
