"""slurm/env.sh's choice of DeepSpeed's op folder ("DeepSpeed ops" in slurm/README.md), sourced by bash as the
job scripts source it, without Slurm: in a job, node-local space of that job and restart ($SLURM_TMPDIR, else
$TMPDIR, else /tmp), marked as the job's own (NBP_JOB_OPS_DIR: train.sbatch removes it at the end); a folder the
user set before is kept and never marked for removal; outside a job nothing is set."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)  # env.sh activates a virtual environment: this one


def ops_folders(**env: str) -> tuple[str, str]:
    """TORCH_EXTENSIONS_DIR and NBP_JOB_OPS_DIR after sourcing slurm/env.sh with exactly ``env`` (+ PATH)."""
    script = 'source slurm/env.sh && printf "%s\\n%s\\n" "${TORCH_EXTENSIONS_DIR-<unset>}" "${NBP_JOB_OPS_DIR-<unset>}"'
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "NBP_VENV": str(VENV), **env})
    assert done.returncode == 0, done.stderr
    extensions, job_own = done.stdout.splitlines()
    return extensions, job_own


@pytest.mark.skipif(not (VENV / "bin" / "activate").is_file(), reason="needs a virtual environment for env.sh")
def test_a_job_builds_its_ops_in_node_local_space_per_job_and_restart_and_a_users_folder_is_kept():
    job = {"SLURM_JOB_ID": "4711"}
    # the order of the README: $SLURM_TMPDIR, else $TMPDIR, else /tmp; one folder per job and restart
    assert ops_folders(**job, SLURM_RESTART_COUNT="2", SLURM_TMPDIR="/local/slurm", TMPDIR="/local/tmp") == (
        "/local/slurm/nbp_ds-ops-job4711-2", "/local/slurm/nbp_ds-ops-job4711-2")
    assert ops_folders(**job, TMPDIR="/local/tmp") == ("/local/tmp/nbp_ds-ops-job4711-0",) * 2
    assert ops_folders(**job) == ("/tmp/nbp_ds-ops-job4711-0",) * 2
    assert ops_folders(**job, SLURM_RESTART_COUNT="1") == ("/tmp/nbp_ds-ops-job4711-1",) * 2
    # the user's own folder (exported before env.sh's line): kept, and not the job's to remove
    assert ops_folders(**job, TORCH_EXTENSIONS_DIR="/scratch/me/ops", SLURM_TMPDIR="/local/slurm") == (
        "/scratch/me/ops", "<unset>")
    # outside a job (a smoke test on this machine): torch's own default
    assert ops_folders(TMPDIR="/local/tmp") == ("<unset>", "<unset>")


def run_folder_of(script: str, **env: str) -> tuple[str, str]:
    """(the config, train.out_dir) that ``bash slurm/SCRIPT`` outside a job would start the trainer with, as its
    "running a single process" line says; the program it starts is NBP_TRAIN_MODULE (a stand-in that exits)."""
    done = subprocess.run(["bash", f"slurm/{script}", "train.steps=1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "NBP_VENV": str(VENV), **env})
    line = next(x for x in done.stdout.splitlines() if "running a single process:" in x)
    words = line.split(": ", 1)[1].split()
    out_dir = next(w.split("=", 1)[1] for w in words if w.startswith("train.out_dir="))
    return words[words.index("--config") + 1], out_dir


@pytest.mark.skipif(not (VENV / "bin" / "activate").is_file(), reason="needs a virtual environment for env.sh")
def test_the_run_folder_is_the_job_name_or_with_the_default_name_the_configs(tmp_path):
    """slurm/README.md: output in ${NBP_RUNS:-runs}/<job name>/; without --job-name (sbatch then sets the script's
    default, nbp-train) the folder is named after the config (a YAML path: its stem); the tokenizer script's run
    folder is runs/<job name>/ too, its default config quickstart."""
    runs = str(tmp_path / "runs")
    quick = {"NBP_RUNS": runs, "NBP_TRAIN_MODULE": "json.tool"}  # a program that exits at once
    assert run_folder_of("train.sbatch", SLURM_JOB_NAME="nbp-train", NBP_CONFIG="ucf101-700m", **quick) == (
        "ucf101-700m", f"{runs}/ucf101-700m")
    assert run_folder_of("train.sbatch", SLURM_JOB_NAME="nbp-train", NBP_CONFIG="configs/my_run.yaml", **quick) == (
        "configs/my_run.yaml", f"{runs}/my_run")
    assert run_folder_of("train.sbatch", SLURM_JOB_NAME="ucf700m", NBP_CONFIG="ucf101-700m", **quick) == (
        "ucf101-700m", f"{runs}/ucf700m")
    assert run_folder_of("train_tokenizer.sbatch", SLURM_JOB_NAME="tok-ucf", NBP_RUNS=runs) == (
        "quickstart", f"{runs}/tok-ucf")
