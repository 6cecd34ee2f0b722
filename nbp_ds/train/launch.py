"""Who am I in the job: rank, world size, local rank and rendezvous address from torchrun, the
deepspeed launcher (both set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT) or srun
(SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; master = first host of SLURM_JOB_NODELIST)."""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

from nbp_ds.errors import UsageError


class LaunchError(UsageError, RuntimeError):
    """The environment does not say how this process fits into the job."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | srun | single


def _int(env: dict, key: str) -> int:
    try:
        return int(env[key])
    except ValueError as exc:
        raise LaunchError(f"environment variable {key}={env[key]!r} is not an integer") from exc


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list ("node[01-04]" -> "node01"), via scontrol when present."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:  # node[01-04,07] -> node01
        prefix, rest = head.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def detect(env: dict | None = None) -> DistEnv:
    """Read the launcher's variables; refuse a half-specified multi-process environment."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [k for k in ("RANK", "WORLD_SIZE") if k not in env]
        if missing:
            raise LaunchError(f"{' and '.join(missing)} missing while the other is set: start with torchrun, the "
                              f"deepspeed launcher or srun, which set RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR")
        world = _int(env, "WORLD_SIZE")
        if world > 1 and "MASTER_ADDR" not in env:
            raise LaunchError(f"WORLD_SIZE={world} but MASTER_ADDR is not set")
        return DistEnv(_int(env, "RANK"), world, _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    ntasks = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1)
    if "SLURM_PROCID" in env and ntasks > 1:
        addr = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        port = int(env.get("MASTER_PORT") or 10000 + int(env.get("SLURM_JOB_ID", "0")) % 50000)
        return DistEnv(_int(env, "SLURM_PROCID"), ntasks, _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                       addr, port, "srun")
    if ntasks > 1 and "SLURM_STEP_ID" not in env:
        raise LaunchError(f"this Slurm allocation has SLURM_NTASKS={ntasks} tasks but the trainer was not started "
                          f"by srun (no SLURM_PROCID): run `srun python -m nbp_ds.train ...` (see slurm/train.sbatch)")
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 29500)), "single")


def export_for_torch(dist_env: DistEnv) -> None:
    """Set the variables torch.distributed's env:// rendezvous reads."""
    os.environ.update({"RANK": str(dist_env.rank), "WORLD_SIZE": str(dist_env.world_size),
                       "LOCAL_RANK": str(dist_env.local_rank), "MASTER_ADDR": dist_env.master_addr,
                       "MASTER_PORT": str(dist_env.master_port)})


def hostname() -> str:
    """This machine's short host name (what Slurm node lists use)."""
    return socket.gethostname().split(".")[0]
