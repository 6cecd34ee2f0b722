"""The step watchdog: a rank that stops making progress ends the job instead of holding its GPUs.

A stalled process (a stuck file system, a lost peer a collective never notices, a deadlock, a rank
stopped by the kernel) would otherwise wait until the job's wall time. :class:`StepWatchdog` watches
the time since the last finished step from a thread of its own. Past the limit, ``max(stall_timeout_s,
stall_factor x the median step time)``, it logs which step stalled, dumps every thread's stack
(:mod:`faulthandler`) and ends the process with :data:`STALLED_EXIT`; the launcher (srun's
``--kill-on-bad-exit``, torchrun) then ends the other ranks and slurm/train.sbatch requeues the job.

Work between steps that is not a step (validation, a checkpoint, the hooks' work, sample videos) runs under
:meth:`StepWatchdog.pause`: it may take longer (the trainer allows ``train.collective_timeout_s``, the bound
its collectives have anyway), and its time is not counted as step time. If the stalled thread holds the
interpreter lock, so that no Python thread can run, faulthandler's own timer (C, no lock needed), armed a
grace period later, dumps the stacks and exits.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from nbp_ds.runtime.distributed import end_daemonic_children

log = logging.getLogger(__name__)

STALLED_EXIT = 3  # the exit status of a rank the watchdog ended
GRACE_S = 30.0  # how long after the limit faulthandler's timer ends a process whose Python threads cannot run
_HISTORY = 200  # step times the median is taken over


class StepWatchdog:
    """Ends this process when no step finishes in time (``timeout_s`` 0: never; see the module docstring)."""

    def __init__(self, timeout_s: float, factor: float, rank: int, poll_s: float = 0.5):
        self.timeout_s, self.factor, self.rank, self.poll_s = timeout_s, factor, rank, poll_s
        self._times: deque[float] = deque(maxlen=_HISTORY)
        self._lock = threading.Lock()
        self._step = 0
        self._last: float | None = None  # when the last step finished (None: what came since was not a step)
        self._deadline: float | None = None
        self._allowed = 0.0  # the time the step under way was given
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def limit(self) -> float:
        """How long a step may take now."""
        median = statistics.median(self._times) if self._times else 0.0
        return max(self.timeout_s, self.factor * median)

    def step_done(self, step: int) -> None:
        """Step ``step`` finished: the next must finish within :meth:`limit`."""
        now = time.monotonic()
        with self._lock:
            if self._last is not None:
                self._times.append(now - self._last)
            self._step, self._last = step, now
            self._arm(now + self.limit())

    @contextmanager
    def pause(self, seconds: float) -> Iterator[None]:
        """Work that is not a step (validation, a save): it may take up to ``seconds`` (or the usual limit, if
        longer), and its time is left out of the step times the limit is taken from."""
        began = time.monotonic()
        with self._lock:
            self._arm(began + max(seconds, self.limit()))
        try:
            yield
        finally:
            now = time.monotonic()
            with self._lock:
                if self._last is not None:
                    self._last += now - began
                self._arm(now + self.limit())

    def start(self, step: int, first_within_s: float) -> None:
        """Begin watching: ``step`` steps are done, the next may take ``first_within_s`` (start-up, compiling)."""
        if not self.enabled:
            return
        self._step = step
        self._thread = threading.Thread(target=self._watch, name="nbp-step-watchdog", daemon=True)
        with self._lock:
            self._arm(time.monotonic() + max(first_within_s, self.limit()))
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.enabled:
            faulthandler.cancel_dump_traceback_later()

    def _arm(self, deadline: float) -> None:
        if self._thread is None or self._stop.is_set():  # not watching (disabled, not started or stopped)
            return
        self._deadline, self._allowed = deadline, deadline - time.monotonic()
        faulthandler.dump_traceback_later(deadline - time.monotonic() + GRACE_S, exit=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                late = self._deadline is not None and time.monotonic() > self._deadline
            if late:
                self._fire()

    def _fire(self) -> None:
        median = statistics.median(self._times) if self._times else float("nan")
        log.error("rank %d stalled in step %d: no training step finished within %.0f s of step %d (the limit is "
                  "max(train.stall_timeout_s=%g, train.stall_factor=%g x the median step time %.3f s)); every "
                  "thread's stack follows, then this process exits with status %d", self.rank, self._step + 1,
                  self._allowed, self._step, self.timeout_s, self.factor, median, STALLED_EXIT)
        for handler in logging.getLogger().handlers:
            handler.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        end_daemonic_children(timeout=1.0)  # a stalled worker among them: a second is all it gets
        os._exit(STALLED_EXIT)
