"""A function over many jobs in worker processes, results in job order, where no job can hang the run.

Each worker is a spawned process that holds one job at a time, handed to it over its own pipe, so the parent
always knows which job a worker holds and since when. A worker that dies (a decoder's segfault, the kernel's
OOM killer) or holds one job longer than the timeout (a decoder in an endless loop, a file whose reads never
return on a hung network file system) is killed together with the processes it started (it leads its own
process group: ffmpeg goes too), its job comes back as a :class:`LostJob` naming why, and a fresh worker takes
its place. The other workers and the jobs they hold are untouched, so only the job that was held is blamed
and nothing else needs retrying.

Why not the standard pools: ``multiprocessing.Pool`` never reports a task whose worker died and waits for it
forever; a ``concurrent.futures`` pool breaks as a whole when one worker dies and fails every job in flight,
without saying which one killed it. Neither bounds one task's time.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

log = logging.getLogger(__name__)

_READY = "ready"  # a worker's first message: it started and can take a job
# a killed process ends at once, unless it is in uninterruptible sleep: the run does not wait on one longer
_DEATH_WAIT_S = 10.0


@dataclass(frozen=True)
class LostJob:
    """A job whose worker was lost: ``reason`` is ``worker_died`` or ``timeout``; ``detail`` says what happened."""

    reason: str
    detail: str


class WorkerStartError(RuntimeError):
    """A worker process exited before it could take a job: a broken environment or an unguarded main script,
    not a job's fault; replacing it would only fail again, forever."""


def ordered_map(fn: Callable, jobs: Sequence, workers: int, timeout: float, window: int) -> Iterator:
    """``fn(job)`` for each job, in job order, computed by ``workers`` spawned processes; a job whose worker died
    or took longer than ``timeout`` seconds gives a :class:`LostJob` instead. At most ``window`` jobs are handed
    out or finished ahead of the one the caller waits for (memory stays bounded when the caller is slower).

    ``fn`` must be importable by name (a module-level function) and should not raise: an exception ends its
    worker, which is then reported as ``worker_died``. The workers are killed when the iterator is closed or
    garbage-collected; use ``contextlib.closing`` to stop them at a known point.
    """
    if workers < 1 or timeout <= 0 or window < 1:
        raise ValueError(f"workers={workers}, timeout={timeout}, window={window}: each must be positive")
    if not jobs:
        return
    ctx = mp.get_context("spawn")  # fork after torch has started threads is unsafe
    pool = [_Worker(ctx, fn) for _ in range(min(workers, len(jobs)))]
    waiting: list[int] = []  # indices of jobs handed to the pool, not yet to a worker, in order
    finished: dict[int, object] = {}
    handed = 0
    try:
        for index in range(len(jobs)):
            while handed < len(jobs) and handed - index < window:
                waiting.append(handed)
                handed += 1
            while index not in finished:
                for worker in pool:
                    if worker.ready and worker.job is None and waiting and worker.give(waiting[0], jobs):
                        waiting.pop(0)
                _collect(pool, finished, timeout, lambda: _Worker(ctx, fn))
            yield finished.pop(index)
    finally:
        for worker in pool:
            worker.stop()


def _collect(pool: list[_Worker], finished: dict[int, object], timeout: float, fresh: Callable[[], _Worker]) -> None:
    """Wait until a worker reports, dies or overruns its deadline; record what it gave and replace a lost one."""
    busy = [w.since + timeout for w in pool if w.job is not None]
    wait_s = max(0.0, min(busy) - time.monotonic()) if busy else None
    # a closed pipe stays readable: once a worker's is closed, only its end (the sentinel) is worth waiting for
    wait([w.conn for w in pool if not w.closed] + [w.process.sentinel for w in pool], timeout=wait_s)
    now = time.monotonic()
    for i, worker in enumerate(pool):
        worker.receive(finished)
        if not worker.process.is_alive():
            if not worker.ready:
                raise WorkerStartError(
                    f"a worker process ended (exit code {worker.process.exitcode}) before it started; worker "
                    "processes are spawned and import the main module again: a script that starts this work must "
                    "do it under `if __name__ == \"__main__\":`")
            lost = (LostJob("worker_died", f"the worker process died ({_how(worker.process.exitcode)}) while "
                                           "holding it: a decoder crash or the kernel's out-of-memory killer")
                    if worker.job is not None else None)
        elif worker.job is not None and now - worker.since >= timeout:
            lost = LostJob("timeout", f"not done after {timeout:g} s; its worker was stopped")
        else:
            continue
        if lost is not None:
            finished[worker.job] = lost
        worker.stop()
        pool[i] = fresh()


def _how(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


class _Worker:
    """One worker process, its pipe, and the job it holds (an index into the jobs) since when."""

    def __init__(self, ctx, fn: Callable):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, fn), daemon=True, name="nbp-worker")
        self.process.start()
        child.close()
        self.ready = self.closed = self.stopped = False
        self.job: int | None = None
        self.since = 0.0

    def give(self, index: int, jobs: Sequence) -> bool:
        """Hand it a job; False when its pipe is closed (it died while idle: the job waits for another worker)."""
        if self.closed:
            return False
        try:
            self.conn.send((index, jobs[index]))
        except OSError:
            self.closed = True
            return False
        self.job, self.since = index, time.monotonic()
        return True

    def receive(self, finished: dict[int, object]) -> None:
        """Take every message waiting in the pipe, and notice a pipe the worker's end closed."""
        try:
            while not self.closed and self.conn.poll():
                message = self.conn.recv()
                if message == _READY:
                    self.ready = True
                else:
                    index, result = message
                    finished[index] = result
                    self.job = None
        except (EOFError, OSError):  # the worker is ending, possibly in the middle of a message
            self.closed = True

    def stop(self) -> None:
        """Kill the worker and what it started, and reap it; again: nothing."""
        if self.stopped:
            return
        self.stopped = True
        # its process group: the worker and what it started (ffmpeg), which outlives a worker that died
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # no such group: it never got to lead one
            pass
        if self.process.exitcode is None:
            self.process.kill()
        self.process.join(_DEATH_WAIT_S)
        if self.process.exitcode is not None:
            self.process.close()
        else:  # in uninterruptible sleep (a read on a hard-mounted NFS): it dies when the read returns, if ever
            log.warning("worker process %d did not end on SIGKILL; left behind", self.process.pid)
        self.conn.close()


def _serve(conn: Connection, fn: Callable) -> None:
    """A worker's life: lead its own process group, answer jobs one at a time, end with its parent."""
    os.setpgid(0, 0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # a background process group reading the terminal would be stopped (ffmpeg reads stdin)
    os.close(devnull)
    threading.Thread(target=_end_with_parent, daemon=True).start()
    conn.send(_READY)
    while True:
        try:
            index, job = conn.recv()
        except EOFError:  # the parent closed the pipe
            return
        conn.send((index, fn(job)))


def _end_with_parent() -> None:
    """Kill this worker's process group when the parent process ends, however it ends (even SIGKILL): a worker
    stuck on a hung file must not outlive the run."""
    parent = mp.parent_process()
    if parent is not None:
        wait([parent.sentinel])
        os.killpg(0, signal.SIGKILL)
