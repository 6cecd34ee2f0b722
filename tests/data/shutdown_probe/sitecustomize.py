"""Put first on PYTHONPATH by the teardown tests (tests/test_teardown.py, tests/test_train_deepspeed.py): in every
rank of a launched job (RANK set), an exit handler that fails the process when the interpreter begins its shutdown
while gloo's threads still run.

A finished rank that reached the interpreter's shutdown with gloo's threads alive (the process groups DeepSpeed's
engine and DDP keep past ``destroy_process_group``) died there now and then with SIGABRT ("terminate called without
an active exception"), one run in twenty under load: too rare to wait for in a test. This handler turns that
condition into a failure every time: it says so on stderr and ends the process with status 134 (SIGABRT's)."""

import atexit
import os
import sys


def _gloo_threads() -> list[str]:
    names = []
    for task in sorted(os.listdir("/proc/self/task")):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return [name for name in names if "gloo" in name]


def _refuse_a_shutdown_with_gloo_threads() -> None:
    if alive := _gloo_threads():
        sys.stderr.write(f"rank {os.environ['RANK']}: the interpreter's shutdown began with gloo's threads "
                         f"running: {alive}\n")
        sys.stderr.flush()
        os._exit(134)


if "RANK" in os.environ:
    atexit.register(_refuse_a_shutdown_with_gloo_threads)
