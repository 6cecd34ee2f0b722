"""The skeleton both trainers run (nbp_ds.runtime.trainer_loop), with a trainer of counters in place of a model:
the save cadence, the stop agreement, the finished marker and the order of the parts, checked against what the
schedule says by hand. The trainers' own tests (test_train_*, test_tokenizer_trainer) run it with real steps."""

from __future__ import annotations

import json
from types import SimpleNamespace

from nbp_ds.runtime.stop import FINISHED
from nbp_ds.runtime.trainer_loop import TrainerLoop
from nbp_ds.runtime.watchdog import StepWatchdog


class CountingTrainer:
    """Records every call the skeleton makes; ``signal_at``: the step after which a stop signal arrives."""

    def __init__(self, stop: SimpleNamespace, step: int = 0, signal_at: int | None = None):
        self.step, self.stop, self.signal_at = step, stop, signal_at
        self.calls: list[tuple[str, int]] = []

    def train_step(self) -> None:
        self.step += 1
        self.calls.append(("step", self.step))
        if self.step == self.signal_at:
            self.stop.signal = 15

    def step_ended(self, step: int) -> None:
        self.calls.append(("ended", step))

    def periodic(self, step: int) -> None:
        self.calls.append(("periodic", step))

    def save_checkpoint(self) -> None:
        self.calls.append(("save", self.step))

    def wrap_up(self, finished: bool) -> None:
        self.calls.append(("finished" if finished else "stopped", self.step))


class Metrics:
    def __init__(self):
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


def loop_for(tmp_path, steps: int, save_every: int, stop: SimpleNamespace, metrics: Metrics) -> TrainerLoop:
    return TrainerLoop(tmp_path, rank=0, steps=steps, save_every=save_every, metrics=metrics, stop=stop,
                       watchdog=StepWatchdog(0.0, 1.0, rank=0))


def test_a_run_saves_on_its_cadence_and_at_the_end_then_marks_itself_finished(tmp_path):
    stop, metrics = SimpleNamespace(signal=None), Metrics()
    trainer = CountingTrainer(stop)
    assert loop_for(tmp_path, 5, 2, stop, metrics).run(trainer) is True
    saves = [s for name, s in trainer.calls if name == "save"]
    assert saves == [2, 4, 5]  # every 2 steps, and the last step's (5 is not due)
    assert metrics.flushes == 3
    assert trainer.calls[:4] == [("step", 1), ("ended", 1), ("periodic", 1), ("step", 2)]
    assert trainer.calls[-2:] == [("save", 5), ("finished", 5)]
    assert json.loads((tmp_path / FINISHED).read_text()) == {"step": 5}


def test_a_stop_signal_saves_at_that_step_and_leaves_no_finished_marker(tmp_path):
    stop, metrics = SimpleNamespace(signal=None), Metrics()
    trainer = CountingTrainer(stop, signal_at=3)
    assert loop_for(tmp_path, 10, 4, stop, metrics).run(trainer) is False
    # the step's periodic work still runs, then the checkpoint, then the trainer's wrap-up
    assert trainer.calls[-4:] == [("ended", 3), ("periodic", 3), ("save", 3), ("stopped", 3)]
    assert not (tmp_path / FINISHED).exists()


def test_a_finished_run_continued_with_more_steps_drops_its_marker_until_it_finishes_again(tmp_path):
    stop, metrics = SimpleNamespace(signal=None), Metrics()
    (tmp_path / FINISHED).write_text(json.dumps({"step": 4}))
    trainer = CountingTrainer(stop, step=4, signal_at=5)
    assert loop_for(tmp_path, 8, 4, stop, metrics).run(trainer) is False
    assert not (tmp_path / FINISHED).exists()
    trainer.calls, stop.signal = [], None
    assert loop_for(tmp_path, 8, 4, stop, metrics).run(trainer) is True
    assert [s for name, s in trainer.calls if name == "save"] == [8]  # 8 is due: saved once
    assert json.loads((tmp_path / FINISHED).read_text()) == {"step": 8}
