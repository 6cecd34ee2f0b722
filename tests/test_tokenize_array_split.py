"""nbp_ds.tokenizer.array_split: an array task's share of the dataset from what Slurm sets (the variables written
out as `sbatch --array=...` sets them, by hand: tests/test_slurm.py submits the real thing), and the split the
output folder records so that a task rerun alone (`--array=2`: an array of one task) does its first run's share."""

from __future__ import annotations

import json

import pytest

from nbp_ds.errors import UsageError
from nbp_ds.tokenizer.array_split import SPLIT_FILE, record_split, resolve_split


def array_task(task: int, low: int, high: int) -> dict[str, str]:
    """What Slurm sets in task ``task`` of `sbatch --array=low-high`."""
    return {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(low), "SLURM_ARRAY_TASK_MAX": str(high),
            "SLURM_ARRAY_TASK_COUNT": str(high - low + 1), "SLURM_ARRAY_TASK_STEP": "1"}


def shares(out, low: int, high: int) -> list[int]:
    return [resolve_split(out, array_task(t, low, high)).index for t in range(low, high + 1)]


@pytest.mark.parametrize(("low", "high"), [(0, 15), (1, 16), (3, 6)])
def test_every_share_once_whatever_the_arrays_first_id(tmp_path, low, high):
    assert sorted(shares(tmp_path, low, high)) == list(range(high - low + 1))
    assert {resolve_split(tmp_path, array_task(t, low, high)).count for t in range(low, high + 1)} == {high - low + 1}


@pytest.mark.parametrize(("low", "high", "rerun"), [(0, 15, 7), (1, 16, 16), (1, 16, 7)])
def test_a_task_rerun_alone_takes_its_first_runs_share_from_the_recorded_split(tmp_path, low, high, rerun):
    first = resolve_split(tmp_path, array_task(rerun, low, high))
    record_split(tmp_path, first.count)
    assert json.loads((tmp_path / SPLIT_FILE).read_text()) == {"num_shards": high - low + 1}
    again = resolve_split(tmp_path, array_task(rerun, rerun, rerun))  # `sbatch --array=<rerun>`
    assert (again.index, again.count) == (first.index, first.count)
    # without a record Slurm's variables alone say one task: what NBP_NUM_SHARDS is for
    fresh = tmp_path / "fresh"
    with_count = resolve_split(fresh, {**array_task(rerun, rerun, rerun), "NBP_NUM_SHARDS": str(high - low + 1)})
    assert (with_count.index, with_count.count) == (first.index, first.count)


def test_another_split_of_a_recorded_folder_is_refused(tmp_path):
    record_split(tmp_path, 4)
    with pytest.raises(UsageError, match=r"spans 8 task ids.*split into 4"):
        resolve_split(tmp_path, array_task(0, 0, 7))
    with pytest.raises(UsageError, match=r"NBP_NUM_SHARDS says 8 shards.*split into 4"):
        resolve_split(tmp_path, {**array_task(0, 0, 3), "NBP_NUM_SHARDS": "8"})
    with pytest.raises(UsageError, match="split into 4 shards; this run asks for 2"):
        record_split(tmp_path, 2)
    assert resolve_split(tmp_path, array_task(2, 0, 3)).count == 4  # the same split is welcome


def test_outside_an_array_one_share_and_bad_values_named(tmp_path):
    alone = resolve_split(tmp_path, {})
    assert (alone.index, alone.count) == (0, 1)
    assert resolve_split(tmp_path, {}, num_shards=3, shard_index=2).index == 2
    with pytest.raises(UsageError, match="NBP_NUM_SHARDS='four'"):
        resolve_split(tmp_path, {"NBP_NUM_SHARDS": "four"})
    with pytest.raises(UsageError, match=r"--shard-index 3 is outside 0\.\.2"):
        resolve_split(tmp_path, {}, num_shards=3, shard_index=3)
    with pytest.raises(UsageError, match="step"):
        resolve_split(tmp_path, {**array_task(0, 0, 6), "SLURM_ARRAY_TASK_STEP": "2"})
