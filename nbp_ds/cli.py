"""Shared entry-point wrapper for the command-line tools."""

from __future__ import annotations

import sys
from collections.abc import Callable

from nbp_ds.config import ConfigError


def run_main(main: Callable[[], int | None]) -> None:
    """Run a tool's ``main`` and exit with its status; a bad config key or value becomes one
    ``error: ...`` line naming it and exit status 2 instead of a traceback."""
    try:
        status = main()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status or 0)
