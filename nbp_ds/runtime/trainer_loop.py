"""The skeleton every trainer runs (the transformer's DeepSpeed trainer, nbp_ds.train.loop, and the tokenizer's
DDP trainer, nbp_ds.tokenizer.trainer): the loop to ``steps``, the stop agreement, the save cadence, the finished
marker, the step watchdog and the teardown. A trainer supplies its step and what it does around it
(:class:`TrainerParts`); the skeleton decides when, the same way for both:

    after each step:  the watchdog hears of it; the trainer's ``step_ended`` (counters, hooks); every rank agrees
                      whether a stop signal arrived (so all stop at the same step); the trainer's ``periodic``
                      work (logs, validation, images); then a stop saves and returns, else a save when due
    at the end:       a save (unless the last step's was due anyway), the trainer's ``wrap_up``, the finished
                      marker (rank 0)

Work between steps runs under :meth:`TrainerLoop.between_steps`, which the watchdog does not count as a step.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from nbp_ds.files import write_text_atomic
from nbp_ds.runtime import distributed
from nbp_ds.runtime.checkpoint import CheckpointRef
from nbp_ds.runtime.metrics import MetricsLogger
from nbp_ds.runtime.stop import FINISHED, StopRequest
from nbp_ds.runtime.watchdog import StepWatchdog

log = logging.getLogger(__name__)


class TrainerParts(Protocol):
    """What a trainer supplies to :class:`TrainerLoop`."""

    @property
    def step(self) -> int:
        """Optimizer steps done (restored by a resume)."""

    def train_step(self) -> None:
        """One optimizer step; ``step`` is one more afterwards."""

    def step_ended(self, step: int) -> None:
        """Right after step ``step``, before the ranks agree on stopping (counters, hooks)."""

    def periodic(self, step: int) -> None:
        """The work due after step ``step`` (logging, validation, images), on every rank alike."""

    def save_checkpoint(self) -> CheckpointRef:
        """A checkpoint of every registered part."""

    def wrap_up(self, finished: bool) -> None:
        """After the last save: ``finished`` (every step done) or stopped by a signal (reports, closing streams)."""


def due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


class TrainerLoop:
    """The loop of one rank: ``steps`` to reach, a checkpoint every ``save_every`` steps (and at the end), the
    run folder ``out_dir`` (for the finished marker), the run's ``metrics``, its ``watchdog`` (timeout 0: off),
    ``stop`` (the signal flags) and ``between_steps_s``, how long work between steps (and the first step) may take
    beyond the watchdog's usual limit."""

    def __init__(self, out_dir: Path, rank: int, steps: int, save_every: int, metrics: MetricsLogger,
                 stop: StopRequest, watchdog: StepWatchdog, between_steps_s: float = 0.0):
        self.out_dir, self.rank, self.steps, self.save_every = Path(out_dir), rank, steps, save_every
        self.metrics, self.stop, self.watchdog, self.between_steps_s = metrics, stop, watchdog, between_steps_s

    def run(self, trainer: TrainerParts) -> bool:
        """Train to ``steps``: True when finished, False when stopped by a signal at a checkpoint. A stalled step
        ends the process (the watchdog); an error is logged with the last step finished."""
        self.watchdog.start(trainer.step, first_within_s=self.between_steps_s)
        try:
            return self._run(trainer)
        except Exception as exc:
            log.error("rank %d failed after step %d (the last one it finished): %s: %s", self.rank, trainer.step,
                      type(exc).__name__, exc)
            raise
        finally:
            self.watchdog.stop()

    def _run(self, trainer: TrainerParts) -> bool:
        if self.rank == 0 and trainer.step < self.steps:
            (self.out_dir / FINISHED).unlink(missing_ok=True)  # e.g. a finished run continued with more steps
        while trainer.step < self.steps:
            trainer.train_step()
            step = trainer.step
            self.watchdog.step_done(step)
            trainer.step_ended(step)
            # every rank must stop at the same step; agreed over the CPU, so the GPU keeps its queue
            stopping = distributed.control_all_reduce([self.stop.signal is not None])[0] > 0
            trainer.periodic(step)
            if stopping:
                self.save(trainer)
                trainer.wrap_up(finished=False)
                self._log0("stopped by signal at step %d; a restart resumes from here", step)
                return False
            if due(step, self.save_every):
                self.save(trainer)
        if not due(trainer.step, self.save_every):
            self.save(trainer)
        trainer.wrap_up(finished=True)
        if self.rank == 0:
            write_text_atomic(self.out_dir / FINISHED, json.dumps({"step": trainer.step}) + "\n")
        self._log0("finished %d steps; checkpoints in %s", trainer.step, self.out_dir / "checkpoints")
        return True

    @contextmanager
    def between_steps(self) -> Iterator[None]:
        """Work that is no part of a step (validation, checkpoints, hooks, samples): not timed as a step."""
        with self.watchdog.pause(self.between_steps_s):
            yield

    def save(self, trainer: TrainerParts) -> CheckpointRef:
        with self.between_steps():
            ref = trainer.save_checkpoint()
        self.metrics.flush()
        return ref

    def close(self) -> None:
        """Leave the process group in step with the other ranks. Call after a run that returned normally (not
        after an exception: a rank that died would leave the others waiting)."""
        self.metrics.close()
        distributed.leave_process_group()

    def _log0(self, *args) -> None:
        if self.rank == 0:
            log.info(*args)
