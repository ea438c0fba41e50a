"""The exception types for mistakes a user can make.

The CLI turns a `UserError` into one line on stderr and exit code 2; every other exception is a
bug and keeps its traceback. Library code raises `UserError` (or a subclass) whenever the fix is
in the user's hands: a path, a recipe value, a plugin name, a checkpoint.

`PluginError` is the one plugins raise (they import it from `dmae_cli.api`). It is a
`ValueError` too, so a plugin written before it existed, raising `ValueError`, means the same.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; rendered as one line, exit code 2."""

    exit_code = 2


class PluginError(UserError, ValueError):
    """A plugin's report of a mistake its user can fix: a missing root, a bad split or option.

    dmae shows it as one line naming the plugin, e.g. `dataset 'idx' from acme-dmae-plugins:
    data.root nowhere is not a directory`, and exits with code 2.
    """
