"""The slurm/*.sbatch scripts on a real two-node Slurm cluster: hosts node1 and node2, each a network
namespace with its own address, hostname and hosts file (tests/virtual_hosts.py), one slurmd each,
sharing this machine's file system as a cluster shares its storage. What a multi-node job depends on
and a one-node job never exercises: the rendezvous at the first host of the node list, resolved by
the other host; gloo connecting across hosts whose own names resolve to 127.0.1.1 (as Debian writes
/etc/hosts); rank != local rank on the second host; the environment reaching srun's tasks on both
hosts; both ranks' checkpoint shards in one folder; a requeue of a job whose step spans two hosts;
array tasks on different hosts writing one dataset."""

from __future__ import annotations

import json
import os
import re
import signal
from collections import Counter
from pathlib import Path

import pytest

from nbp_ds import ffmpeg_tools
from tests.slurm_cluster import SlurmCluster
from tests.slurm_jobs import (
    checkpoint_ranks,
    expected_keys,
    log_text,
    make_videos,
    restarts,
    shard_keys_by_task,
    split_attempts,
    submit_tokenize,
    submit_train,
    task_pid,
    wait_for_step,
)
from tests.train_helpers import make_shards, step_counts

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ONE_RANK_PER_HOST = ["--nodes=2", "--ntasks-per-node=1"]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm2"), nodes=2) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, Path]:
    return make_shards(tmp_path_factory.mktemp("shards"))


def test_training_runs_one_rank_on_each_host(two_nodes, shards, tmp_path):
    # --export with a list, as sites that set SBATCH_EXPORT do: srun's tasks must still get the
    # batch script's environment (the venv, MASTER_ADDR) on both hosts
    exported = "--export=NBP_CONFIG,NBP_CPU,OMP_NUM_THREADS,NBP_RUNS"
    job, out, log = submit_train(two_nodes, tmp_path, shards, "nbp-2nodes", "train.steps=12",
                                 layout=[*ONE_RANK_PER_HOST, exported])
    two_nodes.wait_done(job, timeout=240)
    info = two_nodes.job_info(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", two_nodes.describe(job)
    assert info["NodeList"] == "node[1-2]" and info["Restarts"] == "0", two_nodes.describe(job)

    # every rank reported where it ran, gathered over gloo across the two hosts
    ranks = json.loads((out / "sharding.json").read_text())
    assert [(r["rank"], r["host"], r["world_size"], r["launcher"]) for r in ranks] == \
        [(0, "node1", 2, "srun"), (1, "node2", 2, "srun")]
    text = log_text(log)
    assert "master node1:" in text and "GLOO_SOCKET_IFNAME=eth0" in text, two_nodes.describe(job)
    assert step_counts(out) == {s: 1 for s in range(1, 13)}
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000012"
    assert (out / "finished").is_file()
    # ZeRO-3: each rank saved its own partition of the weights and optimizer into the shared folder
    assert checkpoint_ranks(out / "checkpoints" / "step00000012") == {"model": {0, 1}, "optim": {0, 1},
                                                                      "rng": {0, 1}}


def test_sigusr1_requeues_a_two_host_job_and_resumes(two_nodes, shards, tmp_path):
    job, out, log = submit_train(two_nodes, tmp_path, shards, "nbp-2nodes-requeue", "train.steps=24",
                                 "train.save_every=0", layout=ONE_RANK_PER_HOST, faults={"step_sleep": 0.2})
    wait_for_step(two_nodes, job, out, 6)
    two_nodes.signal_batch(job, "USR1")  # srun passes it to the tasks on both hosts
    two_nodes.wait_done(job, timeout=240)

    info = two_nodes.job_info(job)
    assert info["Restarts"] == "1", two_nodes.describe(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", two_nodes.describe(job)
    assert restarts(log) == ["0", "1"], two_nodes.describe(job)
    text = log_text(log)
    assert text.count("on node[1-2], 2 tasks") == 2, two_nodes.describe(job)
    found = re.search(r"resumed from \S+/(step(\d{8})) at step (\d+)", text)
    assert found and int(found[2]) == int(found[3]) >= 6, two_nodes.describe(job)
    # save_every=0: the only checkpoint before the end is the one the signal asked for, and it holds
    # both ranks' partitions (the resume above read them back on both hosts)
    assert checkpoint_ranks(out / "checkpoints" / found[1]) == {"model": {0, 1}, "optim": {0, 1}, "rng": {0, 1}}
    assert step_counts(out) == {s: 1 for s in range(1, 25)}, two_nodes.describe(job)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000024"


def test_a_rank_killed_on_the_second_host_requeues_the_job_which_resumes_from_the_last_checkpoint(
        two_nodes, shards, tmp_path):
    """SIGKILL the rank on node2 (what a node failure looks like) after step 12, with checkpoints every 10 steps:
    srun ends the step, train.sbatch logs the failure and requeues, the job resumes from step 10 on both hosts
    and finishes; after the requeue every step from 11 on runs exactly once."""
    job, out, log = submit_train(two_nodes, tmp_path, shards, "nbp-2nodes-kill", "train.steps=24",
                                 "train.save_every=10", layout=ONE_RANK_PER_HOST, faults={"step_sleep": 0.2})
    wait_for_step(two_nodes, job, out, 12)
    os.kill(task_pid(job, 1), signal.SIGKILL)
    two_nodes.wait_for(job, lambda: "train.sbatch: requeueing job" in log_text(log), "the requeue", timeout=120)
    first_lines = len((out / "metrics.jsonl").read_text().splitlines())  # the first attempt is over
    two_nodes.wait_done(job, timeout=240)

    info = two_nodes.job_info(job)
    assert info["Restarts"] == "1", two_nodes.describe(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", two_nodes.describe(job)
    text = log_text(log)
    failed = re.search(r"the trainer failed with status \d+ at step (\d+) \(latest checkpoint: step00000010\); "
                       r"failure 1 of this job", text)
    assert failed and int(failed[1]) >= 12, two_nodes.describe(job)
    assert "resumed from" in text and "step00000010 at step 10" in text, two_nodes.describe(job)
    before, after = split_attempts(out, first_lines)
    assert after == {s: 1 for s in range(11, 25)}, two_nodes.describe(job)
    assert set(before.values()) == {1} and sorted(before) == list(range(1, max(before) + 1)) and max(before) >= 12
    records = (out / "train_failures.log").read_text().splitlines()
    assert len(records) == 1 and f"job={job} restart=0 step={failed[1]} " in records[0]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000024"


def test_tokenize_array_spreads_over_both_hosts(two_nodes, tmp_path):
    if ffmpeg_tools.find_tool("ffmpeg") is None:
        pytest.skip(f"ffmpeg is needed to make the test videos: {ffmpeg_tools.INSTALL_HINT}")
    rels = make_videos(tmp_path / "videos")
    out = tmp_path / "shards"
    # one CPU per task, two per host: the four tasks run at once, two on each host
    job = submit_tokenize(two_nodes, tmp_path / "videos", out, tmp_path, array="0-3")
    two_nodes.wait_done(job, timeout=240)
    records = two_nodes.records(job)
    assert [r["JobState"] for r in records] == ["COMPLETED"] * 4, two_nodes.describe(job)
    assert {r["NodeList"] for r in records} == {"node1", "node2"}, two_nodes.describe(job)

    by_task = shard_keys_by_task(out)
    keys = Counter(k for task_keys in by_task.values() for k in task_keys)
    assert all(n == 1 for n in keys.values()), f"duplicated clips: {keys}"
    assert set(keys) == expected_keys(rels), two_nodes.describe(job)
    # task i of 4 takes videos i and i+4 of the 6
    assert {task: len(k) for task, k in by_task.items()} == {0: 2, 1: 2, 2: 1, 3: 1}, two_nodes.describe(job)
