"""Error types shared across the package.

:class:`UsageError` marks a problem with what the user asked for (a config key, a path, a flag, the
launch environment): command-line programs print its message as one ``error: ...`` line and exit
with status 2 (:func:`nbp_ds.cli.command`). Every other exception is a bug or an environment failure
and keeps its traceback.
"""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user; the message names the file, key, flag or value."""


class ConfigError(UsageError, ValueError):
    """A run configuration that cannot be used; the message names the key and value."""


class CheckpointError(UsageError, ValueError):
    """A path that does not hold the checkpoint or weights file it should (missing, dangling, another model's,
    or unreadable without more trust); the message names it and what is wrong."""
