"""The graceful-stop flag: SIGTERM / SIGUSR1 (Slurm preemption, the time-limit signal) set it and the
training loop saves at the next step boundary and exits 0, so the job can be requeued.

Installed first thing in `python -m nbp_ds.train`, before DeepSpeed starts: a signal that arrives while
the model is still being built is remembered instead of killing the process."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)

# the marker a trainer writes into its output folder after the last step's checkpoint (and removes when a run
# continues): slurm/train.sbatch requeues a job that stopped without it
FINISHED = "finished"


class StopRequest:
    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        log.warning("received %s: saving at the next step boundary, then exiting", signal.Signals(signum).name)


_request: StopRequest | None = None


def stop_request() -> StopRequest:
    """The process's one StopRequest, installing the handlers on first use."""
    global _request
    if _request is None:
        _request = StopRequest()
    return _request
