"""User-facing errors.

A `UsageError` is bad input (recipe, paths, arguments): the CLI prints its message as one sentence on stderr and
exits with code 2, without a traceback. Anything else that escapes a command is a failure while running (exit 1).
"""


class UsageError(Exception):
    """Bad input that the user can fix; the message says what to do next."""


class Failed(Exception):
    """A failure while running that one sentence explains (a diverged loss, ...): the CLI prints the message without a
    traceback and exits with code 1. What was kept on disk is named in the message."""
