"""run_tied: a program's commands (torchrun and its trainer ranks included) end when the program dies, even by
SIGKILL, and are stopped with SIGTERM before SIGKILL when the program stops waiting for them."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from processes import alive, wait_for

from nbp_ds.tied_process import run_tied


def pids_in(folder: Path, count: int) -> list[int]:
    """The pids the grandchildren wrote (pid-named files), once ``count`` of them are there."""
    return wait_for(lambda: (lambda p: p if len(p) == count else None)(sorted(int(f.name) for f in folder.iterdir())),
                    120, f"{count} processes to start")


SLEEPER = "import os, pathlib, sys, time; pathlib.Path(sys.argv[1], str(os.getpid())).touch(); time.sleep(600)"


def start_parent(tmp_path: Path, command: list[str]) -> subprocess.Popen:
    """A program that runs ``command`` with run_tied and waits on it."""
    script = textwrap.dedent(f"""
        from nbp_ds.tied_process import run_tied
        run_tied({command!r})
    """)
    return subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path)


def test_the_child_ends_when_its_program_is_killed(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    parent = start_parent(tmp_path, [sys.executable, "-c", SLEEPER, str(pids)])
    (child,) = pids_in(pids, 1)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    wait_for(lambda: not alive(child), 10, f"the child {child} to end after its parent was killed")


def test_torchrun_ranks_end_when_the_program_that_started_torchrun_is_killed(tmp_path):
    """The orphans that were seen: a killed quickstart left torchrun and its two ranks running (each rank runs in
    its own session, so only torchrun can stop them: it must be told, not killed)."""
    pids = tmp_path / "pids"
    pids.mkdir()
    rank = tmp_path / "rank.py"
    rank.write_text(SLEEPER.replace("; ", "\n"))
    parent = start_parent(tmp_path, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc_per_node", "2", str(rank), str(pids)])
    ranks = pids_in(pids, 2)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for pid in ranks:
        wait_for(lambda pid=pid: not alive(pid), 60, f"rank process {pid} to end after the program was killed")


def test_a_timeout_stops_the_child_with_sigterm_first(tmp_path):
    said = tmp_path / "said"
    graceful = (f"import pathlib, signal, sys, time\n"
                f"signal.signal(signal.SIGTERM, lambda *_: (pathlib.Path({str(said)!r}).write_text('stopping'), "
                f"sys.exit(3)))\nprint('working', flush=True)\ntime.sleep(600)")
    began = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        run_tied([sys.executable, "-c", graceful], timeout=2, grace_s=30, stdout=subprocess.PIPE, text=True)
    assert said.read_text() == "stopping"  # it was asked, and it answered before the grace ran out
    assert caught.value.output == "working\n"  # the output so far, as subprocess.run gives it
    assert time.monotonic() - began < 20


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(600)"
    began = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_tied([sys.executable, "-c", stubborn], timeout=1, grace_s=2)
    assert 3 <= time.monotonic() - began < 15


def test_the_result_is_subprocess_runs(tmp_path):
    done = run_tied([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(4)"],
                    capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (4, "out\n", "err\n")
