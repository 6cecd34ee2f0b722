"""The slurm/*.sbatch scripts on a real one-node Slurm cluster (tests/slurm_cluster.py): a CPU
training job with two srun tasks, a checkpoint-and-requeue on SIGUSR1 (what Slurm sends before the
time limit), and a tokenization array job whose tasks split the dataset."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster
from tests.train_helpers import ROOT, make_shards, step_counts

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# a node with few cores runs both tasks: one thread each, and no GPU (train.sbatch asks for 8 by default)
CPU_JOB = ["--ntasks=2", "--ntasks-per-node=2", "--gpus-per-node=0"]
CPU_ENV = {"NBP_CONFIG": "tiny", "NBP_CPU": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, Path]:
    return make_shards(tmp_path_factory.mktemp("shards"))


def submit_train(cluster: SlurmCluster, tmp_path: Path, shards: tuple[Path, Path], name: str, *overrides: str,
                 cwd: Path, script: str, **env: str) -> tuple[str, Path, Path]:
    """sbatch slurm/train.sbatch on CPU; return (job id, out dir, job log)."""
    train, val = shards
    log = tmp_path / f"{name}.log"
    job = cluster.sbatch([f"--job-name={name}", *CPU_JOB, f"--output={log}", script,
                          f"data.train={train}", f"data.val={val}", *overrides],
                         env={**CPU_ENV, "NBP_RUNS": str(tmp_path / "runs"), **env}, cwd=cwd)
    return job, tmp_path / "runs" / name, log


def log_text(log: Path) -> str:
    return log.read_text(errors="replace") if log.is_file() else "(no job log)"


def describe(cluster: SlurmCluster, job: str, log: Path) -> str:
    """What to print when an assert fails: the job's record and the end of its log."""
    return f"job {job}: {cluster.job_info(job)}\n--- job log (end)\n{log_text(log)[-6000:]}"


def test_train_job_runs_to_completion(slurm_cluster, shards, tmp_path):
    # submitted from outside the repository, with the script's absolute path: the job still finds
    # slurm/env.sh and the venv through its Command
    job, out, log = submit_train(slurm_cluster, tmp_path, shards, "nbp-complete", "train.steps=20",
                                 cwd=tmp_path, script=str(ROOT / "slurm" / "train.sbatch"))
    slurm_cluster.wait_done(job, timeout=240)
    info = slurm_cluster.job_info(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", describe(slurm_cluster, job, log)
    assert info["Restarts"] == "0", describe(slurm_cluster, job, log)

    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000020"
    assert (out / "finished").is_file()
    assert list((out / "tb").glob("events.out.tfevents.*")), "no TensorBoard events file"
    assert step_counts(out) == {s: 1 for s in range(1, 21)}
    text = log_text(log)
    assert "ZeRO-3 over 2 processes (srun)" in text, describe(slurm_cluster, job, log)
    assert "train.sbatch: training finished" in text


def test_sigusr1_checkpoints_requeues_and_resumes(slurm_cluster, shards, tmp_path):
    # submitted the documented way: from the repository root with the relative script path
    job, out, log = submit_train(slurm_cluster, tmp_path, shards, "nbp-requeue", "train.steps=40",
                                 cwd=ROOT, script="slurm/train.sbatch", NBP_TEST_STEP_SLEEP="0.2")
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.is_file() and 10 in step_counts(out)):
        assert slurm_cluster.queued(job), "job left the queue before step 10\n" + describe(slurm_cluster, job, log)
        assert time.time() < deadline, "no step 10 within 180 s\n" + describe(slurm_cluster, job, log)
        time.sleep(0.2)
    # what --signal=B:USR1@300 does 300 s before the time limit: signal the batch shell only
    done = subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm_cluster.env(),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr

    # the batch script requeues the job; Slurm holds it for the credential lifetime (cred_expire,
    # 10 s in the test cluster, 120 s by default) before it starts again and resumes
    slurm_cluster.wait_done(job, timeout=240)

    info = slurm_cluster.job_info(job)
    assert info["Restarts"] == "1", describe(slurm_cluster, job, log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", describe(slurm_cluster, job, log)
    text = log_text(log)
    starts = re.findall(r"train\.sbatch: job \d+ \(restart (\d+)\)", text)
    assert starts == ["0", "1"], describe(slurm_cluster, job, log)
    assert "requeueing job" in text and "stopped by signal at step" in text
    assert re.search(r"resumed from \S+step000000(1\d) at step 1\d", text), describe(slurm_cluster, job, log)
    # the trainer saved at the step boundary after the signal: no step lost, none trained twice
    assert step_counts(out) == {s: 1 for s in range(1, 41)}, describe(slurm_cluster, job, log)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000040"
    assert (out / "finished").is_file()


def test_sigterm_to_the_batch_shell_checkpoints_and_stops(slurm_cluster, shards, tmp_path):
    job, out, log = submit_train(slurm_cluster, tmp_path, shards, "nbp-stop", "train.steps=40",
                                 cwd=ROOT, script="slurm/train.sbatch", NBP_TEST_STEP_SLEEP="0.2")
    deadline = time.time() + 180
    while not ((out / "metrics.jsonl").is_file() and 3 in step_counts(out)):
        assert slurm_cluster.queued(job), "job left the queue before step 3\n" + describe(slurm_cluster, job, log)
        assert time.time() < deadline, "no step 3 within 180 s\n" + describe(slurm_cluster, job, log)
        time.sleep(0.2)
    # the batch shell only: a plain scancel also hits srun, which SIGKILLs the tasks on SIGTERM
    done = subprocess.run(["scancel", "--batch", "--signal=TERM", job], env=slurm_cluster.env(),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    slurm_cluster.wait_done(job, timeout=120)

    info = slurm_cluster.job_info(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", describe(slurm_cluster, job, log)
    assert "checkpointed and stopped by SIGTERM: not requeueing" in log_text(log), describe(slurm_cluster, job, log)
    counts = step_counts(out)
    last = max(counts)
    assert 3 <= last < 40 and counts == {s: 1 for s in range(1, last + 1)}
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{last:08d}"
    assert not (out / "finished").exists()


def make_videos(folder: Path) -> list[str]:
    """Six 3-second 64x48 test-pattern videos in two class folders; their paths relative to folder."""
    rels = []
    for i in range(6):
        rel = f"{('circle', 'square')[i % 2]}/v{i}.mp4"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        cmd = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=8", "-t", "3",
               "-pix_fmt", "yuv420p", str(folder / rel)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        rels.append(rel)
    return rels


def test_tokenize_array_tasks_split_the_dataset(slurm_cluster, tmp_path):
    if not (ROOT / "tools" / "tokenize_videos.py").is_file():
        pytest.skip("nbp-tokenize does not exist yet")
    if not shutil.which("ffmpeg"):
        pytest.skip("ffmpeg is not installed (needed to make the test videos)")
    from nbp_ds.data.loader import iter_tar_samples
    from nbp_ds.tokenizer.dataset_listing import sample_key

    rels = make_videos(tmp_path / "videos")
    out = tmp_path / "shards"
    env = {"NBP_CPU": "1", "OMP_NUM_THREADS": "1", "VIDEOS": str(tmp_path / "videos"), "OUT": str(out),
           "TOKENIZER": "random:tiny"}
    log = tmp_path / "tok-%A_%a.log"
    job = slurm_cluster.sbatch(["--array=0-1", "--cpus-per-task=1", "--gpus-per-node=0", f"--output={log}",
                                "slurm/tokenize.sbatch", "--frames", "9", "--resolution", "32", "--fps", "8"],
                               env=env, cwd=ROOT)
    # the check the header of slurm/tokenize.sbatch recommends, as a dependent job; like a user with
    # the venv activated, the submitting environment (which sbatch passes on) has its python first
    check_log = tmp_path / "inspect.log"
    path = f"{ROOT / '.venv' / 'bin'}:{os.environ.get('PATH', '')}"
    check = slurm_cluster.sbatch([f"--dependency=afterok:{job}", "--gpus-per-node=0", f"--output={check_log}",
                                  "--wrap", f"nbp-inspect-shards {out}"],
                                 env={**env, "PATH": path}, cwd=ROOT)
    slurm_cluster.wait_done(job, timeout=240)
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in tmp_path.glob("tok-*.log"))
    assert slurm_cluster.array_states(job) == ["COMPLETED", "COMPLETED"], logs

    by_task = {t: sorted(p.name for p in out.glob(f"shard-{t}-*.tar")) for t in ("t000", "t001")}
    assert by_task["t000"] and by_task["t001"], f"{sorted(p.name for p in out.iterdir())}\n{logs}"
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(by_task["t000"] + by_task["t001"])
    keys: Counter = Counter()
    task_keys: dict[str, set[str]] = {}
    for task, names in by_task.items():
        found = [s["__key__"] for name in names for s in iter_tar_samples(str(out / name), Counter())]
        keys.update(found)
        task_keys[task] = set(found)
    assert all(n == 1 for n in keys.values()), f"duplicated clips: {keys}"
    assert set(keys) == {sample_key(rel, 0) for rel in rels}, logs
    assert len(task_keys["t000"]) == len(task_keys["t001"]) == 3  # every second video each

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
    out = tmp_path / "runs" / "nbp-train"
    assert (out / "finished").is_file() and (out / "checkpoints" / "latest").read_text() == "step00000003"
