"""Profiling a job: a ``torch.profiler`` trace of chosen steps, and a memory snapshot when the GPU runs out.

:func:`trace_profiler` is the one way the project starts the profiler (the trainer's ``train.profile`` window
and the benchmarks' ``--profile``, nbp_ds.perf.profile): CPU activity, CUDA kernels on a GPU, shapes recorded,
and each trace written by ``tensorboard_trace_handler`` as ``<worker>.<time>.pt.trace.json``, a Chrome trace
that Perfetto (ui.perfetto.dev) and chrome://tracing open, and that TensorBoard's profiler view reads
(``pip install torch-tb-profiler; tensorboard --logdir <folder>``).

:class:`StepWindow` traces the training steps ``[start, stop]`` (1-based, both included) of one rank.
:func:`oom_snapshot` keeps CUDA's allocation history while the job runs and, on a
``torch.cuda.OutOfMemoryError``, dumps it beside the trace (``oom_rank<N>.pickle``: drag it into
https://pytorch.org/memory_viz) before the error goes on; on the CPU it does nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TRACE_GLOB = "*.pt.trace.json"
# allocation events CUDA keeps for the snapshot: enough for several steps of a large model, a bounded cost
MEMORY_HISTORY_ENTRIES = 200_000


def trace_profiler(folder: Path, device: torch.device, worker: str, schedule: Callable | None = None):
    """A ``torch.profiler.profile`` (not started) writing its trace into ``folder`` as ``<worker>.<time>.pt.trace.json``
    when its schedule's active steps end, or when it is stopped (no ``schedule``)."""
    from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

    folder.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities, schedule=schedule, record_shapes=True,  # shapes in the trace, for reading it
                   on_trace_ready=tensorboard_trace_handler(str(folder), worker_name=worker))


class StepWindow:
    """Trace training steps ``window = [start, stop]`` into ``folder`` (``enabled`` False: this rank traces
    nothing). Call :meth:`before_step` and :meth:`after_step` around each step; the trace is written after ``stop``.
    A run resumed inside the window traces the rest of it; one resumed after it traces nothing."""

    def __init__(self, window: list[int] | None, folder: Path, device: torch.device, rank: int, enabled: bool):
        self.window = window if enabled else None
        self.folder, self.device, self.rank = folder, device, rank
        self.profiler = None

    def before_step(self, step: int) -> None:
        """``step`` (1-based) is about to run. Tracing starts one step early, untraced, as a warm-up (the
        profiler's own start-up would otherwise fall in the first traced step)."""
        if not self.window or self.profiler is not None:
            return
        start, stop = self.window
        if start - 1 <= step <= stop:
            from torch.profiler import schedule

            warmup = max(start - step, 0)
            self.profiler = trace_profiler(self.folder, self.device, f"rank{self.rank}",
                                           schedule(skip_first=step, wait=0, warmup=warmup,
                                                    active=stop - max(start, step) + 1, repeat=1))
            # ProfilerStep#N in the trace is training step N: the profiler counts from the step it starts at
            # (skip_first makes its schedule count from there too)
            self.profiler.step_num = step
            self.profiler.current_action = self.profiler.schedule(step)
            self.profiler.start()
            log.info("rank %d: profiling steps %d..%d into %s", self.rank, max(start, step), stop, self.folder)

    def after_step(self, step: int) -> None:
        """``step`` has run; the last step of the window writes the trace."""
        if self.profiler is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the step's kernels inside its ProfilerStep range
        self.profiler.step()
        if step >= self.window[1]:
            self.close()

    def close(self) -> None:
        """Write what was traced (a run that stops inside the window keeps its steps so far)."""
        if self.profiler is not None:
            profiler, self.profiler, self.window = self.profiler, None, None
            profiler.stop()
            log.info("rank %d: profiler trace written into %s", self.rank, self.folder)


@contextmanager
def oom_snapshot(folder: Path, device: torch.device, rank: int, enabled: bool) -> Iterator[None]:
    """Inside the block, CUDA records its allocations; an out-of-memory error dumps them to
    ``folder/oom_rank<rank>.pickle`` and is raised on. Nothing on the CPU or when not ``enabled``."""
    if not (enabled and device.type == "cuda"):
        yield
        return
    torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        save_memory_snapshot(folder / f"oom_rank{rank}.pickle")
        raise
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)


def save_memory_snapshot(path: Path) -> Path:
    """CUDA's recorded allocation history into ``path`` (for https://pytorch.org/memory_viz)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.cuda.memory._dump_snapshot(str(path))
    log.error("out of GPU memory: the allocation history is in %s (open it in https://pytorch.org/memory_viz)",
              path)
    return path
