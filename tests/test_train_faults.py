"""Faults a long run meets, each survived or stopped cleanly with nothing lost (issue 24): real DeepSpeed
ZeRO-3 on CPU, two processes over gloo, faults injected through tests/faults.py's hooks or signals."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from processes import alive, children_of
from train_helpers import make_shards, run, start, step_counts, step_losses, train_cmd, wait_for

# slow, and timing: its bounds are wall-clock seconds (`make test` runs it alone, after its parallel part)
pytestmark = [pytest.mark.slow, pytest.mark.timing]

# short enough that a hang fails the test quickly, long enough for a save on two shared cores
COLLECTIVE_TIMEOUT = "train.collective_timeout_s=60"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    make_shards(folder, train=160, val=8)
    return folder


def test_a_full_disk_on_one_rank_fails_the_save_on_every_rank_and_a_restart_resumes(shards, tmp_path):
    """Rank 1's first file of step 10's checkpoint fails with ENOSPC. Every rank must hear of it (rank 0
    names the folder and rank 1's error) well before the collective timeout, 'latest' must stay on step 5,
    the incomplete step-10 folder must be gone, and a restart (space back) resumes from step 5 and ends."""
    out = tmp_path / "out"
    steps = ["train.steps=10", "train.save_every=5", "train.eval_every=0", COLLECTIVE_TIMEOUT]
    began = time.time()
    result = run(train_cmd(out, shards, *steps), faults={"enospc_ranks": [1], "enospc_at": "step00000010"})
    took = time.time() - began
    assert result.returncode != 0
    log = result.stderr
    # rank 0's own traceback (torchrun prefixes a worker's stderr with its rank) ends in the agreed error
    failure = next((line for line in log.splitlines()
                    if line.startswith("[rank0]: ") and "CheckpointSaveError: " in line), None)
    assert failure, log[-5000:]
    assert str(out / "checkpoints" / "step00000010") in failure and "rank 1: OSError: [Errno 28]" in failure
    assert "resumes from" in failure and "step00000005" in failure
    assert took < 60, f"the failure took {took:.0f} s to reach every rank: a collective waited for the timeout"
    assert (out / "checkpoints" / "latest").read_text() == "step00000005"
    assert not (out / "checkpoints" / "step00000010").exists()

    result = run(train_cmd(out, shards, *steps))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "resumed from" in result.stderr and "step00000005" in result.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step00000010"
    assert sorted(step_counts(out)) == list(range(1, 11))


def test_a_truncated_rank_file_in_latest_falls_back_to_the_previous_checkpoint(shards, tmp_path):
    """Step 10's checkpoint loses the end of rank 1's optimizer partition after it was written. A restart must
    name that file, resume from step 5 (not crash in DeepSpeed, not start from step 0) and train steps 6-10
    exactly as the first time."""
    out = tmp_path / "out"
    steps = ["train.steps=10", "train.save_every=5", "train.eval_every=0", COLLECTIVE_TIMEOUT]
    result = run(train_cmd(out, shards, *steps))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    first = step_losses(out)
    bad = out / "checkpoints" / "step00000010" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])

    result = run(train_cmd(out, shards, *steps))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert f"checkpoint {bad.parent} is damaged, not resuming from it: {bad} has" in result.stderr
    assert "resumed from" in result.stderr and "step00000005 at step 5" in result.stderr
    again = step_losses(out)
    assert [again[s] for s in range(6, 11)] == [first[s] for s in range(6, 11)]


def worker_of_rank(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process of ``rank`` (read from its environment)."""
    for pid in children_of(launcher_pid):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker of rank {rank} under {launcher_pid}")


@pytest.mark.parametrize("guard", ["watchdog", "collective_timeout"])
def test_a_stopped_rank_ends_the_job_within_the_bound_naming_the_step(shards, tmp_path, guard):
    """SIGSTOP rank 1 mid-run (a hung process: it neither answers nor dies). Rank 0 must end within its bound,
    naming the step it stalled in: by the step watchdog (3 s without a step, the collective timeout far
    away), or, with the watchdog off, by the 8 s collective timeout."""
    bound = {"watchdog": ["train.stall_timeout_s=3", "train.stall_factor=5", "train.collective_timeout_s=120"],
             "collective_timeout": ["train.stall_timeout_s=0", "train.collective_timeout_s=8"]}[guard]
    out, log = tmp_path / "out", tmp_path / "log"
    proc = start(train_cmd(out, shards, "train.steps=400", "train.save_every=0", "train.eval_every=0", *bound),
                 log, faults={"step_sleep": 0.1})
    wait_for(lambda: (out / "metrics.jsonl").is_file() and len(step_counts(out)) >= 5, proc, "step 5")
    rank0, rank1 = worker_of_rank(proc.pid, 0), worker_of_rank(proc.pid, 1)
    os.kill(rank1, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        wait_for(lambda: not alive(rank0), proc, "rank 0 exits", timeout=90)
        took = time.monotonic() - stopped
    finally:
        os.kill(rank1, signal.SIGCONT)  # so torchrun's SIGTERM ends it at once
    assert proc.wait(timeout=90) != 0
    text = log.read_text()
    last = max(step_counts(out))
    if guard == "watchdog":
        found = re.search(r"\[rank 0\] .*rank 0 stalled in step (\d+): no training step finished within", text)
        assert found, text[-5000:]
        assert "most recent call first" in text  # faulthandler's stacks
        assert took < 3 + 25, f"rank 0 ended {took:.0f} s after rank 1 stopped"
        stalled = int(found[1])
    else:
        # gloo words its timeout two ways: "Timed out waiting ..." or "Application timeout caused pair closure"
        found = re.search(r"\[rank 0\] .*rank 0 failed after step (\d+) \(the last one it finished\): "
                          r".*(?:Timed out|timeout caused)", text)
        assert found, text[-5000:]
        assert 8 <= took < 8 + 25, f"rank 0 ended {took:.0f} s after rank 1 stopped"
        stalled = int(found[1]) + 1
    assert stalled in (last + 1, last + 2)  # the step under way (its log line may not have been written yet)
