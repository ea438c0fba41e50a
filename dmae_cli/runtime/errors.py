"""The one exception type for mistakes a user can make.

The CLI turns a `UserError` into one line on stderr and exit code 2; every other exception is a
bug and keeps its traceback. Library code raises `UserError` (or a subclass) whenever the fix is
in the user's hands: a path, a recipe value, a plugin name, a checkpoint.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; rendered as one line, exit code 2."""

    exit_code = 2
