"""The one exception type for mistakes a user can fix.

The command line catches `UserError`, prints its message (which names the problem and the
fix) and exits with status 2, without a traceback. Anything else is a bug and keeps its
traceback.
"""


class UserError(ValueError):
    """Bad input: a wrong shape, a non-finite value, an out-of-range setting, a bad file."""


class Diverged(UserError):
    """Training produced a loss or weights that are not finite, or a loss far above where it began."""
