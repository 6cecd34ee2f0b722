"""Error types shared across the package.

:class:`UsageError` marks a problem with what the user asked for (a config key, a path, a flag, the
launch environment): command-line programs print its message as one ``error: ...`` line and exit
with status 2 (:func:`nbp_ds.cli.command`). Every other exception is a bug or an environment failure
and keeps its traceback.
"""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user; the message names the file, key, flag or value."""
