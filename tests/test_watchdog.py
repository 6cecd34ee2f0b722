"""The step watchdog in a process of its own (it ends the process it watches)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from train_helpers import env

from nbp_ds.runtime.watchdog import STALLED_EXIT, StepWatchdog

# Their bounds are wall-clock seconds: `make test` runs them alone, after its parallel part (pyproject's markers).
pytestmark = pytest.mark.timing

STALL = """
import logging, time
from nbp_ds.runtime.watchdog import StepWatchdog
logging.basicConfig(level=logging.INFO)
watchdog = StepWatchdog(timeout_s={timeout}, factor={factor}, rank=0, poll_s=0.05)
watchdog.start(0, first_within_s=5)
for step in range(1, 6):
    time.sleep({step_s})
    watchdog.step_done(step)
print("stalling", flush=True)
time.sleep(60)
"""


def run_stall(timeout: float, factor: float, step_s: float) -> tuple[subprocess.CompletedProcess, float]:
    code = STALL.format(timeout=timeout, factor=factor, step_s=step_s)
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=60)
    return result, time.monotonic() - began - 5 * step_s  # seconds from the last step to the exit


def test_a_stalled_step_dumps_every_stack_and_exits_within_the_fixed_bound():
    result, waited = run_stall(timeout=1.0, factor=0, step_s=0.05)
    assert result.returncode == STALLED_EXIT, result.stderr[-2000:]
    assert "stalling" in result.stdout
    assert "rank 0 stalled in step 6: no training step finished within 1 s of step 5" in result.stderr
    # faulthandler's dump: the watchdog's own thread, and the stalled main thread at its sleep (line 11)
    assert "Current thread" in result.stderr and 'File "<string>", line 11 in <module>' in result.stderr
    assert 1.0 <= waited < 10


def test_the_bound_grows_with_the_median_step_time():
    # steps of 0.4 s and a factor of 5: the limit is 2 s, not the 0.5 s floor
    result, waited = run_stall(timeout=0.5, factor=5, step_s=0.4)
    assert result.returncode == STALLED_EXIT, result.stderr[-2000:]
    assert "within 2 s of step 5" in result.stderr
    assert 2.0 <= waited < 10


def test_allowances_and_a_disabled_watchdog():
    watchdog = StepWatchdog(timeout_s=0, factor=20, rank=0)
    watchdog.start(0, first_within_s=1)
    assert not watchdog.enabled and watchdog._thread is None  # 0: no thread, no faulthandler timer
    watchdog = StepWatchdog(timeout_s=1, factor=10, rank=0)
    watchdog._times.extend([0.1, 0.2, 0.3])
    assert watchdog.limit() == 2.0  # 10 x the median 0.2 s


def test_work_under_a_pause_is_not_counted_as_step_time():
    watchdog = StepWatchdog(timeout_s=100, factor=1, rank=0)
    watchdog.step_done(1)
    with watchdog.pause(5):
        time.sleep(0.3)  # a save or a hook: not a step
    watchdog.step_done(2)
    assert len(watchdog._times) == 1 and watchdog._times[0] < 0.2


# ---- between-step work longer than the step bound (issue 36) ----------------------------------------------

BETWEEN_STEPS = """
import logging, time
from nbp_ds.runtime.watchdog import StepWatchdog
logging.basicConfig(level=logging.INFO)
watchdog = StepWatchdog(timeout_s=0.5, factor=0, rank=0, poll_s=0.05)
watchdog.start(0, first_within_s=5)
for step in range(1, 4):
    time.sleep(0.05)
    watchdog.step_done(step)
with watchdog.pause(6):  # a save: it may take twelve times the step bound of 0.5 s
    print("saving at", time.monotonic(), flush=True)
    time.sleep({save_s})
print("saved at", time.monotonic(), flush=True)
for step in range(4, 7):
    time.sleep({step_s})
    watchdog.step_done(step)
print("finished", flush=True)
"""


def run_between_steps(save_s: float, step_s: float, since: str) -> tuple[subprocess.CompletedProcess, float]:
    """The run's result and the seconds from its line ``since`` (the save's start or end) to its exit (the
    monotonic clock is the machine's, the same in both processes)."""
    result = subprocess.run([sys.executable, "-c", BETWEEN_STEPS.format(save_s=save_s, step_s=step_s)], env=env(),
                            capture_output=True, text=True, timeout=60)
    ended = time.monotonic()
    marks = dict(line.rsplit(" at ", 1) for line in result.stdout.splitlines() if " at " in line)
    return result, ended - float(marks[since]) if since in marks else float("nan")


def test_a_save_longer_than_the_step_bound_does_not_end_a_healthy_run():
    result, _ = run_between_steps(save_s=1.5, step_s=0.05, since="saving")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "finished" in result.stdout and "stalled" not in result.stderr


def test_a_hang_during_between_step_work_is_still_ended_after_its_allowance():
    result, waited = run_between_steps(save_s=60, step_s=0.05, since="saving")
    assert result.returncode == STALLED_EXIT, result.stderr[-2000:]
    assert "rank 0 stalled in step 4: no training step finished within 6 s of step 3" in result.stderr
    assert 6.0 <= waited < 17


def test_a_hang_in_the_step_after_between_step_work_gets_the_step_bound_again():
    result, waited = run_between_steps(save_s=1.5, step_s=60, since="saved")
    assert result.returncode == STALLED_EXIT, result.stderr[-2000:]
    assert "rank 0 stalled in step 4" in result.stderr
    assert 0.5 <= waited < 3.5  # the step's 0.5 s from the save's end, not the 4.5 s left of the save's 6 s
