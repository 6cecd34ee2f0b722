"""The command-line programs of nbp_ds, one module each (console scripts ``nbp-*``, see pyproject.toml).

Every program's ``main(argv)`` is wrapped by :func:`command`, the one place where an error becomes an
exit status: a :class:`~nbp_ds.errors.UsageError` (bad config key, missing file, wrong flag) is printed
as a single ``error: ...`` line and gives status 2; anything else keeps its traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable

from nbp_ds.errors import UsageError

Main = Callable[..., int | None]


def command(main: Main) -> Callable[..., int]:
    """Decorate a program's ``main(argv, ...)`` so it returns an exit status (0, its own, or 2 on a UsageError)."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None, *args, **kwargs) -> int:
        try:
            status = main(argv, *args, **kwargs)
        except UsageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return int(status or 0)

    return wrapper


def setup_logging(ranked: bool = False, fmt: str = "%(asctime)s %(name)s: %(message)s") -> None:
    """Log INFO to stderr. ``ranked`` (a program that runs once per process of a distributed job): each line
    names its rank and only rank 0 logs INFO, the others WARNING and above, so the log reads as one run."""
    if not ranked:
        logging.basicConfig(level=logging.INFO, format=fmt)
        return
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
