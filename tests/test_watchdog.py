"""The step watchdog in a process of its own (it ends the process it watches)."""

from __future__ import annotations

import subprocess
import sys
import time

from train_helpers import env

from nbp_ds.runtime.watchdog import STALLED_EXIT, StepWatchdog

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
