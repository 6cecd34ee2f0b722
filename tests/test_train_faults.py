"""Faults a long run meets, each survived or stopped cleanly with nothing lost (issue 24): real DeepSpeed
ZeRO-3 on CPU, two processes over gloo, faults injected through tests/faults.py's hooks or signals."""

from __future__ import annotations

import time

import pytest
from train_helpers import make_shards, run, step_counts, step_losses, train_cmd

pytestmark = pytest.mark.slow

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
