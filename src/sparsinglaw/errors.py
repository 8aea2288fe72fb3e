"""User-facing errors: one clear line, non-zero exit, no traceback (the CLI catches UserError)."""


class UserError(Exception):
    """A problem with the user's input or environment that they can fix; the message says how."""
