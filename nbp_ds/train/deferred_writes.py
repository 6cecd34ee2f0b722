"""A failed file write inside DeepSpeed's checkpoint save, kept until every rank can hear of it.

DeepSpeed's ``save_checkpoint`` has barriers between and after its file writes. A rank whose write raises
(a full disk, a quota, EIO) would leave that sequence while its peers wait at the next barrier, and the job
would hang, or meet again at mismatched collectives and fail with a message about neither. Wrapped by
:class:`DeferredWriteErrors`, the engine's checkpoint engine keeps the first ``OSError`` instead (and skips
this rank's later writes of that save: the checkpoint is lost anyway), so the rank goes through DeepSpeed's
collectives in step with the others; :meth:`DeferredWriteErrors.raise_deferred` raises it afterwards, where
:class:`nbp_ds.runtime.checkpoint.CheckpointManager` lets every rank hear of every rank's failure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class DeferredWriteErrors:
    """DeepSpeed's checkpoint engine (``engine.checkpoint_engine``) with its write errors deferred; every
    other method is the wrapped engine's. ``before_write(path)`` runs before each file is written."""

    def __init__(self, inner: Any, before_write: Callable[[str], None] | None = None):
        self._inner = inner
        self._before_write = before_write
        self.error: OSError | None = None

    def save(self, state_dict: Any, path: str) -> None:
        if self.error is not None:
            return
        try:
            if self._before_write is not None:
                self._before_write(path)
            self._inner.save(state_dict, path)
        except OSError as exc:
            self.error = exc

    def raise_deferred(self) -> None:
        """Raise the write error kept since the last call, if any."""
        error, self.error = self.error, None
        if error is not None:
            raise error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def defer_write_errors(engine: Any, before_write: Callable[[str], None] | None = None) -> DeferredWriteErrors:
    """Wrap ``engine``'s checkpoint engine (a DeepSpeed engine) in place; the wrapper, to ask for its errors."""
    engine.checkpoint_engine = DeferredWriteErrors(engine.checkpoint_engine, before_write)
    return engine.checkpoint_engine
