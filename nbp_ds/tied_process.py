"""Run a command as a child process that never outlives the program that started it.

Programs that run their work as commands (the quickstart's stages, the quality bench's trainings, gpu-check's
steps) start torchrun, which starts the trainer ranks, which start loader workers. If such a program dies
without a word (SIGKILL from a test's or a scheduler's timeout, the OOM killer), ``subprocess.run`` leaves
the whole tree running as orphans that hold the cores, the GPU and the run folder. And when it gives up on a
child itself (a timeout, Ctrl-C), ``subprocess.run`` kills only the child: torchrun killed by SIGKILL cannot
stop its ranks, which run in their own sessions.

:func:`run_tied` closes both holes. On Linux the kernel sends the child SIGTERM the moment its parent dies,
however it dies (``prctl(PR_SET_PDEATHSIG)``; it tracks the thread that started the child, so call it from a
thread that lives as long as the program, as the main thread does). When the program stops waiting (timeout,
Ctrl-C, any exception), the child gets SIGTERM and ``grace_s`` seconds to stop in order (torchrun stops its
ranks; a trainer saves a checkpoint at its next step boundary and exits) before SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence

# long enough for torchrun to stop its ranks (it gives each 30 s after SIGTERM) and exit
DEFAULT_GRACE_S = 45.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _tie_to(parent: int) -> Callable[[], None] | None:
    """What the forked child runs before exec: ask for SIGTERM when ``parent`` dies (kept across exec)."""
    if _LIBC is None:
        return None

    def tie() -> None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the tie was made: nobody would ever signal us
            os.kill(os.getpid(), signal.SIGTERM)

    return tie


def stop(child: subprocess.Popen, grace_s: float = DEFAULT_GRACE_S) -> None:
    """SIGTERM, ``grace_s`` seconds to exit, then SIGKILL (a second Ctrl-C while waiting skips the grace)."""
    if child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(grace_s)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        child.kill()
        child.wait()


def run_tied(cmd: Sequence[str], *, timeout: float | None = None, grace_s: float = DEFAULT_GRACE_S,
             **popen_kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, timeout=timeout, **popen_kwargs)`` (the same result, the same TimeoutExpired with
    the output so far), except that the child is stopped with :func:`stop` rather than killed outright, and
    gets SIGTERM from the kernel if this process dies first (see the module docstring)."""
    if popen_kwargs.pop("capture_output", False):
        popen_kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with subprocess.Popen(list(cmd), preexec_fn=_tie_to(os.getpid()), **popen_kwargs) as child:
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(child, grace_s)
            out, err = child.communicate()
            raise subprocess.TimeoutExpired(child.args, timeout, output=out, stderr=err) from None
        except BaseException:
            stop(child, grace_s)
            raise
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)
