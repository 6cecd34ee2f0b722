"""This repository's slurm/*.sbatch scripts as CPU jobs on a test cluster (tests/slurm_cluster.py):
what the one-node and the two-node Slurm tests submit, and how they read what the jobs left."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

from tests.slurm_cluster import SlurmCluster
from tests.train_helpers import ROOT, step_counts, with_faults
from tests.video_fixtures import lavfi_video

# the tiny model on CPU, one thread per task; no GPU (the scripts ask for some by default)
CPU_ENV = {"NBP_CONFIG": "tiny", "NBP_CPU": "1", "OMP_NUM_THREADS": "1"}
NO_GPU = "--gpus-per-node=0"


def submit_train(cluster: SlurmCluster, tmp_path: Path, shards: tuple[Path, Path], name: str, *overrides: str,
                 layout: list[str], cwd: Path = ROOT, script: str = "slurm/train.sbatch",
                 faults: dict | None = None, **env: str) -> tuple[str, Path, Path]:
    """sbatch slurm/train.sbatch on CPU with the task layout given (e.g. --nodes=2 --ntasks-per-node=1) and
    tests/faults.py's ``faults`` injected (e.g. ``{"step_sleep": 0.2}``); return (job id, run folder, job log)."""
    train, val = shards
    log = tmp_path / f"{name}.log"
    command, fault_env = with_faults([script, f"data.train={train}", f"data.val={val}", *overrides], faults)
    if faults:  # the trainer imports the hooks from tests/
        fault_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    # the script's defaults ask for a GPU node's cores; these test nodes declare two
    job = cluster.sbatch([f"--job-name={name}", "--cpus-per-task=1", *layout, NO_GPU, f"--output={log}", *command],
                         env={**CPU_ENV, "NBP_RUNS": str(tmp_path / "runs"), **fault_env, **env}, cwd=cwd)
    return job, tmp_path / "runs" / name, log


# where the one-node CPU smoke test line is documented; the test submits it as written there
SMOKE_LINE_DOCS = (ROOT / "slurm" / "README.md", ROOT / "slurm" / "train.sbatch", ROOT / "README.md")


def documented_cpu_lines(nodes: int) -> list[str]:
    """Every documented `NBP_CPU=1 sbatch ... slurm/train.sbatch ...` line for ``nodes`` nodes (a line without
    --nodes is one node), from the READMEs and train.sbatch's header (comment marks and continuations joined)."""
    lines = []
    for doc in SMOKE_LINE_DOCS:
        text = doc.read_text()
        if doc.suffix == ".sbatch":
            text = re.sub(r"^#+ ?", "", text, flags=re.M)
        text = text.replace("\\\n", " ")
        for found in re.findall(r"^\s*(NBP_CPU=1 [^\n`]*\bsbatch [^\n`]*slurm/train\.sbatch[^\n`]*)", text, flags=re.M):
            line = " ".join(found.split("#")[0].split())
            asked = re.search(r"--nodes=(\d+)", line)
            if (int(asked[1]) if asked else 1) == nodes:
                lines.append(line)
    return lines


def log_text(log: Path) -> str:
    return log.read_text(errors="replace") if log.is_file() else "(no job log)"


def wait_for_step(cluster: SlurmCluster, job: str, out: Path, step: int, timeout: float = 180) -> None:
    """Wait until the run has logged training step ``step`` (and is still in the queue)."""
    cluster.wait_for(job, lambda: (out / "metrics.jsonl").is_file() and step in step_counts(out),
                     f"training step {step} in {out / 'metrics.jsonl'}", timeout=timeout, poll=0.2)


def restarts(log: Path) -> list[str]:
    """The restart count train.sbatch printed at each start of the job, in order."""
    return re.findall(r"train\.sbatch: job \d+ \(restart (\d+)\)", log_text(log))


def checkpoint_ranks(tag_dir: Path) -> dict[str, set[int]]:
    """Which ranks wrote each kind of file into a checkpoint folder: DeepSpeed's ZeRO model and
    optimizer partitions (zero_pp_rank_<r>_mp_rank_00_*_states.pt) and our RNG states (rank<r>_rng.pt)."""
    found: dict[str, set[int]] = {"model": set(), "optim": set(), "rng": set()}
    for f in tag_dir.iterdir():
        if m := re.fullmatch(r"zero_pp_rank_(\d+)_mp_rank_00_(model|optim)_states\.pt", f.name):
            found[m[2]].add(int(m[1]))
        elif m := re.fullmatch(r"rank(\d+)_rng\.pt", f.name):
            found["rng"].add(int(m[1]))
    return found


def task_pid(job: str, rank: int) -> int:
    """The pid of the job's training task of ``rank``, found by its environment (the test hosts share this
    machine's process table); not its data loader workers, which inherit it."""
    found: dict[int, int] = {}  # pid -> parent pid
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if (f"SLURM_JOB_ID={job}".encode() in environ and f"SLURM_PROCID={rank}".encode() in environ
                and b"nbp_ds.train" in cmdline):
            found[int(proc.name)] = ppid
    tasks = [pid for pid, ppid in found.items() if ppid not in found]
    assert len(tasks) == 1, f"job {job}: expected one training task of rank {rank}, found {tasks}"
    return tasks[0]


def split_attempts(out: Path, lines_before: int) -> tuple[dict[int, int], dict[int, int]]:
    """How often each step was logged (metrics.jsonl) in its first ``lines_before`` lines and after them."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    counts: tuple[dict[int, int], dict[int, int]] = ({}, {})
    for i, line in enumerate(lines):
        row = json.loads(line)
        if "train/loss" in row:
            part = counts[i >= lines_before]
            part[row["step"]] = part.get(row["step"], 0) + 1
    return counts


# ---- tokenization --------------------------------------------------------------------------------
VIDEO_CLASSES = ("circle", "square")


def make_videos(folder: Path, count: int = 6) -> list[str]:
    """``count`` 3-second 64x48 test-pattern videos, alternately in two class folders; their paths
    relative to ``folder``."""
    rels = [f"{VIDEO_CLASSES[i % 2]}/v{i}.mp4" for i in range(count)]
    for rel in rels:
        lavfi_video(folder / rel, size="64x48", rate=8, seconds=3, extra=("-pix_fmt", "yuv420p"))
    return rels


def expected_keys(rels: list[str]) -> set[str]:
    """The shard keys of the first clip of each video, written out by the convention (class folder,
    two underscores, stem, then __c00 for clip 0), not by the code that makes them."""
    return {rel.removesuffix(".mp4").replace("/", "__") + "__c00" for rel in rels}


def submit_tokenize(cluster: SlurmCluster, videos: Path, out: Path, log_dir: Path, array: str,
                    layout: tuple[str, ...] = ("--cpus-per-task=1",), cwd: Path = ROOT) -> str:
    """sbatch slurm/tokenize.sbatch (the one in ``cwd``) as an array job over ``videos`` into ``out`` on CPU, tiny
    clips."""
    env = {"NBP_CPU": "1", "OMP_NUM_THREADS": "1", "VIDEOS": str(videos), "OUT": str(out), "TOKENIZER": "random:tiny"}
    return cluster.sbatch([f"--array={array}", *layout, NO_GPU, f"--output={log_dir / 'tok-%A_%a.log'}",
                           "slurm/tokenize.sbatch", "--frames", "9", "--resolution", "32", "--fps", "8"],
                          env=env, cwd=cwd)


def write_job_scripts(folder: Path) -> Path:
    """`nbp-slurm-template --out FOLDER` with this test session's Python (its venv becomes the scripts' default, as
    for a user's installed copy); the folder holding the written slurm/."""
    done = subprocess.run([sys.executable, "-m", "nbp_ds.cli.slurm_template", "--out", str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return folder


def shard_keys_by_task(out: Path) -> dict[int, list[str]]:
    """The sample keys in each array task's shards (shard-t<task>-*.tar), read with tarfile: a
    sample's key is its member names up to the first dot (the WebDataset convention)."""
    keys: dict[int, list[str]] = {}
    for shard in sorted(out.glob("*.tar")):
        m = re.fullmatch(r"shard-t(\d+)-\d+\.tar", shard.name)
        assert m, f"unexpected file name {shard.name} in {out}"
        with tarfile.open(shard) as tar:
            names = sorted({member.name.split(".", 1)[0] for member in tar.getmembers() if member.isfile()})
        keys.setdefault(int(m[1]), []).extend(names)
    return keys
