"""Helpers for the trainer tests: learnable synthetic shards and torchrun launches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from processes import alive, children_of

from nbp_ds.data import TokenShardWriter

ROOT = Path(__file__).resolve().parents[1]
GRID = (3, 4, 4)


def make_shards(folder: Path, train: int = 320, val: int = 32, seed: int = 0) -> tuple[Path, Path]:
    """Class-dependent token patterns with 10% noise: a tiny model's loss falls fast on them."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        with TokenShardWriter(folder / split, maxcount=40) as writer:
            for i in range(n):
                label = i % 4
                base = (np.arange(48) * (label + 1)) % 64
                noisy = rng.random(48) < 0.1
                writer.write(f"{split}{i:05d}", np.where(noisy, rng.integers(0, 64, 48), base).reshape(GRID),
                             label, {})
    return folder / "train", folder / "val"


def train_cmd(out_dir: Path, shards: Path, *overrides: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "nbp_ds.train", "--config", "tiny", f"data.train={shards / 'train'}",
            f"data.val={shards / 'val'}", f"train.out_dir={out_dir}", "train.log_every=1", *overrides]


def env(**extra: str) -> dict[str, str]:
    # tests/ is importable so that train.hooks=faults:FaultHooks (tests/faults.py) loads in the trainer
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), **extra}


def with_shutdown_probe() -> dict[str, str]:
    """Extra environment that puts tests/data/shutdown_probe first on PYTHONPATH: a rank whose interpreter begins
    its shutdown with gloo's threads alive exits 134, saying so (see that module)."""
    return {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "data" / "shutdown_probe"), env()["PYTHONPATH"]])}


def with_faults(cmd: list[str], faults: dict | None) -> tuple[list[str], dict[str, str]]:
    """A training command with tests/faults.py's hooks injecting ``faults`` (see that module), and its env."""
    if not faults:
        return cmd, {}
    return [*cmd, "train.hooks=faults:FaultHooks"], {"NBP_FAULTS": json.dumps(faults)}


def run(cmd: list[str], timeout: float = 300, faults: dict | None = None,
        **extra_env: str) -> subprocess.CompletedProcess:
    """Run a command; a leading "python" means this interpreter (the venv's)."""
    cmd = [sys.executable, *cmd[1:]] if cmd[0] == "python" else cmd
    cmd, fault_env = with_faults(cmd, faults)
    return subprocess.run(cmd, env=env(**fault_env, **extra_env), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


_launched: list[subprocess.Popen] = []


def start(cmd: list[str], log: Path, faults: dict | None = None, **extra_env: str) -> subprocess.Popen:
    """Start a launch in its own process group, so the whole group can be signalled or killed. Whatever a test
    leaves running (it failed before killing it) is killed after the test (conftest's kill_leftover_launches)."""
    cmd, fault_env = with_faults(cmd, faults)
    proc = subprocess.Popen(cmd, env=env(**fault_env, **extra_env), cwd=ROOT, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    _launched.append(proc)
    return proc


def kill_leftover_launches() -> None:
    while _launched:
        proc = _launched.pop()
        if proc.poll() is None:
            kill_group(proc, signal.SIGKILL)
            proc.wait(timeout=60)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    """Poll ``condition()`` until true; fail if the launch exits first or the time runs out."""
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before: {what}")
        if time.time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def wait_for_latest(out_dir: Path, tag: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    latest = out_dir / "checkpoints" / "latest"
    wait_for(lambda: latest.is_file() and latest.read_text().strip() == tag, proc, f"checkpoint {tag}", timeout)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the whole launch: torchrun starts each worker in a session of its own, so signalling the
    launcher's process group alone would leave the workers (and their data workers) running."""
    workers = children_of(proc.pid)
    for pid in workers:
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
    os.killpg(proc.pid, sig)
    if sig == signal.SIGKILL:
        deadline = time.time() + 30
        while any(alive(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.05)


def signal_workers(proc: subprocess.Popen, sig: int) -> int:
    """Signal the launcher's worker processes, not the launcher: what srun does to its tasks on preemption
    (torchrun itself treats SIGTERM as a failure of the job and exits non-zero)."""
    children = children_of(proc.pid)
    for pid in children:
        os.kill(pid, sig)
    return len(children)


def step_losses(out_dir: Path) -> dict[int, float]:
    """Train loss per step from metrics.jsonl; a step logged twice (redone after a kill) keeps the last."""
    losses = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            losses[row["step"]] = row["train/loss"]
    return losses


def step_counts(out_dir: Path) -> dict[int, int]:
    counts: dict[int, int] = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            counts[row["step"]] = counts.get(row["step"], 0) + 1
    return counts
