"""User-facing errors: one clear line, non-zero exit, no traceback (the CLI catches UserError)."""


class UserError(Exception):
    """A problem with the user's input or environment that they can fix; the message says how."""

    exit_code = 2


class NotReached(UserError):
    """The run finished and wrote its results, but did not reach what was asked (exit status 3)."""

    exit_code = 3
