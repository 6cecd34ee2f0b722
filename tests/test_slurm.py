"""The slurm/*.sbatch scripts on a real one-node Slurm cluster (tests/slurm_cluster.py): a CPU
training job with two srun tasks, a checkpoint-and-requeue on SIGUSR1 (what Slurm sends before the
time limit), a tokenization array job whose tasks split the dataset, and the CPU smoke-test line of
slurm/README.md submitted as written. The same on two hosts: tests/test_slurm_multinode.py."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from nbp_ds import ffmpeg_tools
from tests.slurm_jobs import (
    CPU_ENV,
    NO_GPU,
    documented_cpu_lines,
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
    write_job_scripts,
)
from tests.test_readme import shell_commands
from tests.train_helpers import ROOT, make_shards, step_counts

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# a node with few cores runs both tasks: one thread each
TWO_TASKS_ONE_NODE = ["--ntasks=2", "--ntasks-per-node=2"]
ONE_TASK = ["--ntasks=1", "--ntasks-per-node=1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, Path]:
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def written_jobs(tmp_path_factory) -> Path:
    """The folder a user gets from `nbp-slurm-template --out ~/jobs` (its slurm/ holds every script); the tests
    below submit from there, as that user would."""
    folder = write_job_scripts(tmp_path_factory.mktemp("jobs"))
    assert sorted(p.name for p in (folder / "slurm").iterdir()) == sorted(
        p.name for p in (ROOT / "nbp_ds" / "slurm").iterdir()), "nbp-slurm-template left a script out"
    return folder


def test_train_job_runs_to_completion(slurm_cluster, shards, tmp_path):
    # submitted from outside the repository, with the script's absolute path: the job still finds
    # slurm/env.sh and the venv through its Command; and from a shell holding a launcher's stale variables (a
    # trainer run in-process before sets them): the tasks still form one run of two processes
    stale = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    job, out, log = submit_train(slurm_cluster, tmp_path, shards, "nbp-complete", "train.steps=20",
                                 layout=TWO_TASKS_ONE_NODE, cwd=tmp_path, script=str(ROOT / "slurm" / "train.sbatch"),
                                 **stale)
    slurm_cluster.wait_done(job, timeout=240)
    info = slurm_cluster.job_info(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", slurm_cluster.describe(job)
    assert info["Restarts"] == "0", slurm_cluster.describe(job)

    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000020"
    assert (out / "finished").is_file()
    assert list((out / "tb").glob("events.out.tfevents.*")), "no TensorBoard events file"
    assert step_counts(out) == {s: 1 for s in range(1, 21)}
    text = log_text(log)
    assert "ZeRO-3 over 2 processes (srun)" in text, slurm_cluster.describe(job)
    assert "train.sbatch: training finished" in text


def test_sigusr1_checkpoints_requeues_and_resumes(slurm_cluster, shards, tmp_path):
    # submitted the documented way: from the repository root with the relative script path
    job, out, log = submit_train(slurm_cluster, tmp_path, shards, "nbp-requeue", "train.steps=40",
                                 layout=TWO_TASKS_ONE_NODE, faults={"step_sleep": 0.2})
    wait_for_step(slurm_cluster, job, out, 10)
    # what --signal=B:USR1@300 does 300 s before the time limit: signal the batch shell only
    slurm_cluster.signal_batch(job, "USR1")

    # the batch script requeues the job; Slurm holds it for the credential lifetime (cred_expire,
    # 10 s in the test cluster, 120 s by default) before it starts again and resumes
    slurm_cluster.wait_done(job, timeout=240)

    info = slurm_cluster.job_info(job)
    assert info["Restarts"] == "1", slurm_cluster.describe(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", slurm_cluster.describe(job)
    text = log_text(log)
    assert restarts(log) == ["0", "1"], slurm_cluster.describe(job)
    assert "requeueing job" in text and "stopped by signal at step" in text
    assert re.search(r"resumed from \S+step000000(1\d) at step 1\d", text), slurm_cluster.describe(job)
    # the trainer saved at the step boundary after the signal: no step lost, none trained twice
    assert step_counts(out) == {s: 1 for s in range(1, 41)}, slurm_cluster.describe(job)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000040"
    assert (out / "finished").is_file()


def test_sigterm_to_the_batch_shell_checkpoints_and_stops(slurm_cluster, shards, tmp_path):
    job, out, log = submit_train(slurm_cluster, tmp_path, shards, "nbp-stop", "train.steps=40",
                                 layout=TWO_TASKS_ONE_NODE, faults={"step_sleep": 0.2})
    wait_for_step(slurm_cluster, job, out, 3)
    # the batch shell only: a plain scancel also hits srun, which SIGKILLs the tasks on SIGTERM
    slurm_cluster.signal_batch(job, "TERM")
    slurm_cluster.wait_done(job, timeout=120)

    info = slurm_cluster.job_info(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", slurm_cluster.describe(job)
    assert "checkpointed and stopped by SIGTERM: not requeueing" in log_text(log), slurm_cluster.describe(job)
    counts = step_counts(out)
    last = max(counts)
    assert 3 <= last < 40 and counts == {s: 1 for s in range(1, last + 1)}
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{last:08d}"
    assert not (out / "finished").exists()


def test_a_stopped_rank_is_ended_by_the_watchdog_and_the_job_requeues_and_resumes(slurm_cluster, shards, tmp_path):
    """SIGSTOP rank 1 after step 8 (a hung process): rank 0's watchdog ends it within its 4 s bound naming the
    step, srun ends the stopped rank, train.sbatch requeues, and the job resumes from step 5 and finishes."""
    job, out, log = submit_train(slurm_cluster, tmp_path, shards, "nbp-stall", "train.steps=20", "train.save_every=5",
                                 "train.stall_timeout_s=4", "train.stall_factor=5", "train.collective_timeout_s=300",
                                 layout=TWO_TASKS_ONE_NODE, faults={"step_sleep": 0.2})
    wait_for_step(slurm_cluster, job, out, 8)
    os.kill(task_pid(job, 1), signal.SIGSTOP)
    slurm_cluster.wait_for(job, lambda: "train.sbatch: requeueing job" in log_text(log), "the requeue", timeout=120)
    first_lines = len((out / "metrics.jsonl").read_text().splitlines())
    slurm_cluster.wait_done(job, timeout=240)

    info = slurm_cluster.job_info(job)
    assert info["Restarts"] == "1", slurm_cluster.describe(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", slurm_cluster.describe(job)
    text = log_text(log)
    stalled = re.search(r"rank 0 stalled in step (\d+): no training step finished within", text)
    assert stalled and int(stalled[1]) >= 9, slurm_cluster.describe(job)
    assert re.search(r"the trainer failed with status \d+ at step", text), slurm_cluster.describe(job)
    resumed = re.search(r"resumed from \S+/step(\d{8}) at step (\d+)", text)
    assert resumed and int(resumed[1]) >= 5, slurm_cluster.describe(job)
    _, after = split_attempts(out, first_lines)
    assert after == {s: 1 for s in range(int(resumed[1]) + 1, 21)}, slurm_cluster.describe(job)
    assert (out / "finished").is_file()


def test_a_failure_at_the_same_step_again_is_not_requeued(slurm_cluster, shards, tmp_path):
    """Every attempt fails at step 7 (a deterministic bug): the first failure is requeued, the second, at the
    same step, ends the job with the trainer's status."""
    job, out, log = submit_train(slurm_cluster, tmp_path, shards, "nbp-crash", "train.steps=20", "train.save_every=5",
                                 layout=TWO_TASKS_ONE_NODE, faults={"crash_at_step": 7})
    slurm_cluster.wait_done(job, timeout=300)

    info = slurm_cluster.job_info(job)
    assert info["Restarts"] == "1" and info["JobState"] == "FAILED", slurm_cluster.describe(job)
    text = log_text(log)
    # srun's status: the highest of its tasks' (1, or 143 for the task it terminated after the first failed)
    failures = re.findall(r"the trainer failed with status \d+ at step (\d+) \(latest checkpoint: step00000005\)", text)
    assert failures == ["6", "6"], slurm_cluster.describe(job)
    assert "failed again at step 6 with no progress since the last failure: not requeueing" in text
    assert len((out / "train_failures.log").read_text().splitlines()) == 2


def test_no_requeue_past_the_failure_budget(slurm_cluster, shards, tmp_path):
    """NBP_MAX_FAILURES=0: the first failure (here a refused config key, exit 2) ends the job."""
    job, out, log = submit_train(slurm_cluster, tmp_path, shards, "nbp-budget", "train.stepz=3",
                                 layout=TWO_TASKS_ONE_NODE, NBP_MAX_FAILURES="0")
    slurm_cluster.wait_done(job, timeout=120)
    info = slurm_cluster.job_info(job)
    assert info["Restarts"] == "0" and info["JobState"] == "FAILED", slurm_cluster.describe(job)
    text = log_text(log)
    assert re.search(r"the trainer failed with status \d+ at step none \(latest checkpoint: none\)", text), \
        slurm_cluster.describe(job)
    assert "1 failures, more than NBP_MAX_FAILURES=0: not requeueing" in text, slurm_cluster.describe(job)


def test_a_failure_is_kept_as_a_line_naming_job_restart_step_status_checkpoint_nodes_and_time(
        slurm_cluster, shards, tmp_path):
    """slurm/README.md, Failures: each failure is a line of `<out dir>/train_failures.log` with the job, the
    restart, the last step logged, the exit status, the latest checkpoint, the nodes and the time; each field
    compared with what the job's own record, metrics.jsonl and checkpoints/latest say (NBP_MAX_FAILURES=0: one
    failure, no requeue)."""
    began = datetime.now(UTC)
    job, out, log = submit_train(slurm_cluster, tmp_path, shards, "nbp-failure-line", "train.steps=20",
                                 "train.save_every=5", layout=TWO_TASKS_ONE_NODE, faults={"crash_at_step": 7},
                                 NBP_MAX_FAILURES="0")
    slurm_cluster.wait_done(job, timeout=300)
    info = slurm_cluster.job_info(job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", slurm_cluster.describe(job)
    lines = (out / "train_failures.log").read_text().splitlines()
    assert len(lines) == 1, lines
    fields = dict(word.split("=", 1) for word in lines[0].split())
    assert list(fields) == ["job", "restart", "step", "status", "checkpoint", "nodes", "time"], lines[0]
    last_step = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert fields["job"] == job and fields["restart"] == "0" and fields["step"] == str(last_step), lines[0]
    assert int(fields["status"]) != 0 and fields["nodes"] == info["NodeList"], lines[0]
    assert fields["checkpoint"] == (out / "checkpoints" / "latest").read_text().strip() == "step00000005"
    assert began - timedelta(seconds=1) <= datetime.fromisoformat(fields["time"]) <= datetime.now(UTC)


def test_requeues_after_a_checkpointed_stop_end_at_nbp_max_requeues(slurm_cluster, shards, tmp_path):
    """NBP_MAX_REQUEUES=0: a SIGUSR1 checkpoint leaves the run unfinished and the job is not requeued (exit 1).
    (Failures have their own budget, NBP_MAX_FAILURES: test_no_requeue_past_the_failure_budget.)"""
    job, out, log = submit_train(slurm_cluster, tmp_path, shards, "nbp-no-requeue", "train.steps=40",
                                 layout=ONE_TASK, faults={"step_sleep": 0.2}, NBP_MAX_REQUEUES="0")
    wait_for_step(slurm_cluster, job, out, 3)
    slurm_cluster.signal_batch(job, "USR1")
    slurm_cluster.wait_done(job, timeout=120)
    info = slurm_cluster.job_info(job)
    assert info["Restarts"] == "0" and info["ExitCode"] == "1:0", slurm_cluster.describe(job)
    assert "already restarted 0 times: not requeueing" in log_text(log), slurm_cluster.describe(job)
    assert (out / "checkpoints" / "latest").is_file() and not (out / "finished").exists()


def test_a_tokenize_array_task_rerun_alone_redoes_its_share_once(slurm_cluster, written_jobs, tmp_path):
    """The written slurm/tokenize.sbatch as a 1-based array of four tasks (--array=1-4: task 4 takes share 0), then
    task 2 rerun alone after its shards were lost (`--array=2`, an array of one task for Slurm): it redoes its own
    share, the other tasks' files stay untouched, and the union holds every clip once. (0-based arrays:
    tests/test_slurm_multinode.py; the rule itself: tests/test_tokenize_array_split.py.)"""
    if ffmpeg_tools.find_tool("ffmpeg") is None:
        pytest.skip(f"ffmpeg is needed to make the test videos: {ffmpeg_tools.INSTALL_HINT}")
    rels = make_videos(tmp_path / "videos")
    out = tmp_path / "shards"
    job = submit_tokenize(slurm_cluster, tmp_path / "videos", out, tmp_path, array="1-4", cwd=written_jobs)
    slurm_cluster.wait_done(job, timeout=300)
    assert slurm_cluster.array_states(job) == ["COMPLETED"] * 4, slurm_cluster.describe(job)
    first = shard_keys_by_task(out)
    # every video dealt once: shares 0..3 of the six sorted videos hold 2, 2, 1, 1 of them
    assert sorted(len(first[t]) for t in range(4)) == [1, 1, 2, 2], first
    for task in (1, 2, 3, 4):  # --workers defaults to the task's --cpus-per-task (1 here; the script's own is 4)
        assert ", 1 workers," in log_text(tmp_path / f"tok-{job}_{task}.log")

    lost = sorted(out.glob("shard-t002-*.tar")) + sorted((out / "manifests").glob("shard-t002-*.json"))
    assert lost, sorted(p.name for p in out.iterdir())
    for f in lost:  # task 2's work lost (a node's disk, a task killed before its manifests)
        f.unlink()
    kept = {f: f.stat().st_mtime_ns for f in out.glob("shard-t00[013]-*.tar")}
    rerun = submit_tokenize(slurm_cluster, tmp_path / "videos", out, tmp_path, array="2", cwd=written_jobs)
    check_log = tmp_path / "inspect.log"
    path = f"{ROOT / '.venv' / 'bin'}:{os.environ.get('PATH', '')}"
    # the check the header of slurm/tokenize.sbatch recommends, as a dependent job; like a user with the venv
    # activated, the submitting environment (which sbatch passes on) has its python first
    check = slurm_cluster.sbatch([f"--dependency=afterok:{rerun}", NO_GPU, f"--output={check_log}",
                                  "--wrap", f"python -m nbp_ds.cli.inspect_shards {out}"],
                                 env={**CPU_ENV, "PATH": path}, cwd=written_jobs)
    slurm_cluster.wait_done(rerun, timeout=240)
    assert slurm_cluster.array_states(rerun) == ["COMPLETED"], slurm_cluster.describe(rerun)
    assert "shard index 2 of 4" in log_text(tmp_path / f"tok-{rerun}_2.log"), slurm_cluster.describe(rerun)
    assert {f: f.stat().st_mtime_ns for f in kept} == kept, "the rerun rewrote another task's shards"
    again = shard_keys_by_task(out)
    assert again == first, (first, again)
    keys = Counter(k for task_keys in again.values() for k in task_keys)
    assert all(n == 1 for n in keys.values()), f"duplicated clips: {keys}"
    assert set(keys) == expected_keys(rels), slurm_cluster.describe(job)

    slurm_cluster.wait_done(check, timeout=120)
    info = slurm_cluster.job_info(check)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log_text(check_log)


def test_train_sbatch_runs_outside_slurm_as_a_smoke_test(shards, tmp_path):
    """`bash slurm/train.sbatch ...` without a Slurm job: one process, the same env.sh, to the end."""
    train, val = shards
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(CPU_ENV, NBP_RUNS=str(tmp_path / "runs"))
    result = subprocess.run(["bash", "slurm/train.sbatch", f"data.train={train}", f"data.val={val}",
                             "train.steps=3", "train.save_every=0", "train.eval_every=0"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "not in a Slurm job, running a single process" in result.stdout
    out = tmp_path / "runs" / "tiny"  # no job name: the folder is named after the config
    assert (out / "finished").is_file() and (out / "checkpoints" / "latest").read_text() == "step00000003"


def test_tokenizer_job_checkpoints_requeues_and_resumes_on_sigusr1(slurm_cluster, written_jobs, tmp_path):
    # the written slurm/train_tokenizer.sbatch (nbp-slurm-template), submitted from its folder: 2 srun tasks (DDP
    # over gloo), the quickstart tokenizer config, one loader worker per rank; SIGUSR1 to the batch shell as before
    # the time limit
    videos = tmp_path / "videos"
    make_videos(videos, count=7)
    name = "nbp-tok-requeue"
    log = tmp_path / f"{name}.log"
    job = slurm_cluster.sbatch(
        [f"--job-name={name}", "--cpus-per-task=1", *TWO_TASKS_ONE_NODE, NO_GPU, f"--output={log}",
         "slurm/train_tokenizer.sbatch", f"data.videos={videos}", "data.workers=1", "train.batch_size=2",
         "train.steps=16", "train.log_every=1", "train.save_every=100"],
        env={**CPU_ENV, "NBP_CONFIG": "quickstart", "NBP_RUNS": str(tmp_path / "runs")}, cwd=written_jobs)
    out = tmp_path / "runs" / name
    wait_for_step(slurm_cluster, job, out, 3, timeout=240)
    slurm_cluster.signal_batch(job, "USR1")
    slurm_cluster.wait_done(job, timeout=400)

    info = slurm_cluster.job_info(job)
    assert info["Restarts"] == "1", slurm_cluster.describe(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", slurm_cluster.describe(job)
    text = log_text(log)
    assert restarts(log) == ["0", "1"], slurm_cluster.describe(job)
    assert "requeueing job" in text and "stopped by signal at step" in text
    assert re.search(r"resumed from \S+step0000000\d at step \d", text), slurm_cluster.describe(job)
    assert step_counts(out) == {s: 1 for s in range(1, 17)}, slurm_cluster.describe(job)
    assert (out / "finished").is_file() and (out / "tokenizer" / "tokenizer.safetensors").is_file()


# the reasons of a pending job that will never start, whatever it waits for
NEVER_STARTS = ("PartitionConfig", "PartitionNodeLimit", "BadConstraints", "ReqNodeNotAvail")


def test_the_documented_cpu_smoke_test_line_runs_as_written(slurm_cluster, shards, tmp_path):
    """The one-node CPU line of slurm/README.md (and train.sbatch's header, which must say the same), with the
    data placeholders filled in and nothing else added: on this small node it must start (not pend on the
    script's GPU-node core count), train with DeepSpeed's ops pointed at the job's node-local folder, compile none
    of them (CPU), and remove that folder at its end."""
    lines = documented_cpu_lines(nodes=1)
    assert len(lines) >= 2 and len(set(lines)) == 1, f"the docs disagree on the one-node CPU line: {lines}"
    words = shlex.split(lines[0])
    env = dict(w.split("=", 1) for w in words[:words.index("sbatch")])
    train, val = shards
    filled = {"data.train=...": f"data.train={train}", "data.val=...": f"data.val={val}"}
    args = [filled.get(w, w) for w in words[words.index("sbatch") + 1:]]
    assert not [a for a in args if a.endswith("...")], f"unknown placeholder in {lines[0]}"
    log, node_tmp = tmp_path / "documented.log", tmp_path / "node_tmp"
    node_tmp.mkdir()
    # what the user's shell holds: where runs go, the job's name and log (sbatch reads SBATCH_*), its temporary
    # space; TORCH_EXTENSIONS_DIR unset (the test session's own prebuilt folder would skip the build)
    job = slurm_cluster.sbatch(args, cwd=ROOT, env={**env, "NBP_RUNS": str(tmp_path / "runs"), "TMPDIR": str(node_tmp),
                                                     "SBATCH_JOB_NAME": "nbp-documented", "SBATCH_OUTPUT": str(log),
                                                     "TORCH_EXTENSIONS_DIR": ""})
    # what a compiled op would leave in the job's node-local op folder, put there before the job trains: the
    # folder must be gone at the end (a CPU run compiles nothing into it itself)
    ops = node_tmp / f"nbp_ds-ops-job{job}-0"
    (ops / "some_op").mkdir(parents=True)
    (ops / "some_op" / "some_op.so").write_bytes(b"\x7fELF")
    deadline = time.time() + 60
    while (info := slurm_cluster.job_info(job)).get("JobState") == "PENDING" and time.time() < deadline:
        assert info.get("Reason") not in NEVER_STARTS, (
            f"the documented line never starts here: {info.get('Reason')} (NumCPUs={info.get('NumCPUs')})\n"
            + slurm_cluster.describe(job))
        time.sleep(0.5)
    out = tmp_path / "runs" / "nbp-documented"
    slurm_cluster.wait_done(job, timeout=300)
    info = slurm_cluster.job_info(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", slurm_cluster.describe(job)
    steps = int(re.search(r"train\.steps=(\d+)", lines[0])[1])
    assert step_counts(out) == {s: 1 for s in range(1, steps + 1)} and (out / "finished").is_file()
    text = log_text(log)
    assert f"DeepSpeed ops compile into {ops} (this job's own: removed at its end)" in text, text[-3000:]
    assert "deepspeed_shm_comm" not in text, text[-3000:]  # nbp_ds skips DeepSpeed's CPU all-reduce op
    assert not ops.exists(), "train.sbatch left the job's op folder behind"


# the README's recipe at toy size: what each placeholder of "UCF-101 on N GPU nodes" becomes on this machine
# (one CPU node, two classes of six short test videos, the tiny model, the random tiny tokenizer, a stand-in I3D)
RECIPE_HEADING = "## UCF-101 on N GPU nodes"


def recipe_commands() -> list[str]:
    """The commands of the README's recipe, continuation lines joined, comments dropped."""
    section = (ROOT / "README.md").read_text().split(RECIPE_HEADING, 1)[1].split("\n## ", 1)[0]
    return shell_commands(section)


def toy_size(command: str, tmp: Path, i3d: Path) -> str:
    """The recipe's command at toy size: data paths into ``tmp``, small clips, arrays, model and sampling, the
    test cluster's CPU node instead of GPU nodes. Whatever is not replaced runs as written."""
    toy = [("/data/ucf101/", f"{tmp}/ucf101/"), ("/data/shards/ucf101/", f"{tmp}/shards/"),
           ("TOKENIZER=runs/tok/tokenizer", "TOKENIZER=random:tiny"),
           ("--frames 17 --resolution 128", "--frames 9 --resolution 16"),  # tokens (3, 4, 4): the tiny grid
           ("--array=0-15", "--array=0-1"), ("--array=0-3", "--array=1-2"),
           ("NBP_CONFIG=ucf101-700m", "NBP_CONFIG=tiny"),
           ("--nodes=4", "--nodes=1 --ntasks-per-node=1"), ("--num 100", "--num 1"),
           ("i3d_torchscript.pt", f"{i3d} --num-frames 8 --device cpu")]
    for placeholder, value in toy:
        command = command.replace(placeholder, value)
    if " sbatch " in f" {command} ":
        command = command.replace("sbatch ", f"sbatch --parsable {NO_GPU} --cpus-per-task=1 ", 1)
    if "slurm/train.sbatch" in command:
        command += " train.steps=2 train.save_every=0 train.eval_every=0 model.vocab_size=1000"
    if "slurm/sample.sbatch" in command:
        command += " --device cpu --writers 1"
    return command


def test_the_ucf101_recipe_runs_at_toy_size(slurm_cluster, tmp_path):
    """README, "UCF-101 on N GPU nodes": every command, in order, as written but for toy_size's replacements, from
    the folder `nbp-slurm-template --out ~/jobs` writes (HOME is a temporary folder): the array jobs tokenize,
    the training job finishes, the watching commands find its queue entry, log and TensorBoard events, the
    sampling job samples from the run, and FVD is computed from what it wrote."""
    from test_fvd import _save_detector  # the suite's stand-in for StyleGAN-V's I3D detector

    if ffmpeg_tools.find_tool("ffmpeg") is None:
        pytest.skip(f"ffmpeg is needed to make the test videos: {ffmpeg_tools.INSTALL_HINT}")
    make_videos(tmp_path / "ucf101" / "train", count=4)
    make_videos(tmp_path / "ucf101" / "val", count=2)
    i3d = _save_detector(tmp_path / "i3d.pt", 32)
    home = tmp_path / "home"
    home.mkdir()
    env = slurm_cluster.env(**CPU_ENV, HOME=str(home), PATH=f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}")
    commands = recipe_commands()
    assert commands[0].startswith("nbp-slurm-template --out ~/jobs"), commands[0]
    cwd = tmp_path
    for command in commands:
        toy = toy_size(command, tmp_path, i3d)
        if toy.startswith("tensorboard --logdir "):  # a server for a browser: what it would serve is there
            logdir = cwd / toy.split()[2]
            assert list(logdir.glob("events.out.tfevents.*")), f"nothing for TensorBoard in {logdir}"
            continue
        done = subprocess.run(["bash", "-c", toy], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{toy}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        if command.startswith("nbp-slurm-template"):
            cwd = home / "jobs"
        if "sbatch" in toy:
            job = done.stdout.strip().split(";")[0]
            slurm_cluster.wait_done(job, timeout=400)
            states = slurm_cluster.array_states(job)
            assert states and set(states) == {"COMPLETED"}, f"{toy}\n{slurm_cluster.describe(job)}"
        if toy.startswith("tail "):
            assert "train.sbatch: training finished" in done.stdout, done.stdout
    assert sorted(p.name for p in (home / "jobs" / "slurm").iterdir()) == sorted(
        p.name for p in (ROOT / "nbp_ds" / "slurm").iterdir()), "nbp-slurm-template left a script out"
    assert sorted(shard_keys_by_task(tmp_path / "shards" / "train")) == [0, 1]
    assert sorted(shard_keys_by_task(tmp_path / "shards" / "val")) == [0, 1]  # --array=1-2: task 2 takes share 0
    assert (home / "jobs" / "runs" / "ucf700m" / "finished").is_file()
    assert list((home / "jobs" / "samples" / "ucf700m" / "frames").glob("*.npy"))
    assert "FVD" in done.stdout + done.stderr, done.stdout


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs a node of 2 CPUs for a task of 2")
def test_every_srun_task_gets_the_cores_it_asked_for_and_omp_threads_follow(slurm_cluster, written_jobs, tmp_path):
    """Since Slurm 22.05 srun does not take --cpus-per-task from sbatch: train.sbatch passes it on
    (SRUN_CPUS_PER_TASK). Read inside the job (tests/slurm_probe.py in the trainer's place): a task of
    --cpus-per-task=2, bound to its CPUs as srun binds threads (SLURM_CPU_BIND=threads), may run on 2 of them,
    and OMP_NUM_THREADS says 2 although the submitting shell held 1."""
    out, log = tmp_path / "probe", tmp_path / "probe.log"
    job = slurm_cluster.sbatch(["--cpus-per-task=2", *ONE_TASK, NO_GPU, f"--output={log}", "slurm/train.sbatch",
                                f"train.out_dir={out}"],
                               env={**CPU_ENV, "NBP_TRAIN_MODULE": "tests.slurm_probe", "PYTHONPATH": str(ROOT),
                                    "SLURM_CPU_BIND": "threads"}, cwd=written_jobs)
    slurm_cluster.wait_done(job, timeout=120)
    info = slurm_cluster.job_info(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", slurm_cluster.describe(job)
    seen = json.loads((out / "cores-rank0.json").read_text())
    assert len(seen["affinity"]) == 2 and seen["omp_num_threads"] == "2", seen
