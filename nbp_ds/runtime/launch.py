"""Who am I in the job: rank, world size, local rank and rendezvous address from torchrun, the
deepspeed launcher (both set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT) or srun
(SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; master = first host of the step's node list), and
which network interface gloo should use when the job spans several hosts."""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import re
import socket
import struct
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from nbp_ds.errors import UsageError

log = logging.getLogger(__name__)


class LaunchError(UsageError, RuntimeError):
    """The environment does not say how this process fits into the job."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int  # the process' index on its own host (SLURM_LOCALID), which picks its GPU
    master_addr: str
    master_port: int
    launcher: str  # torchrun | deepspeed | srun | single
    hosts: tuple[str, ...] = ()  # srun: the step's hosts, in Slurm's order (the first is the master)
    host: str = ""  # srun: the host this process runs on (SLURMD_NODENAME)
    local_world_size: int = 1  # processes of the job on this host (0: the launcher does not say)
    gpus_on_node: int | None = None  # srun: the GPUs Slurm allocated on this host (SLURM_GPUS_ON_NODE)

    @property
    def peers(self) -> tuple[str, ...]:
        """The other hosts of the job (empty when it runs on one host or the launcher does not say)."""
        return tuple(h for h in self.hosts if h != self.host)


def _int(env: dict, key: str, default: int | None = None) -> int:
    if key not in env or env[key] == "":
        if default is None:
            raise LaunchError(f"environment variable {key} is not set")
        return default
    try:
        return int(env[key])
    except ValueError as exc:
        raise LaunchError(f"environment variable {key}={env[key]!r} is not an integer") from exc


def expand_hostlist(nodelist: str) -> list[str]:
    """Slurm's compact host list, expanded in order: "gpu[01-03,07],login1" -> gpu01 gpu02 gpu03 gpu07
    login1. Ranges keep the width of their first number; several bracket groups multiply
    ("r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2)."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        parts = re.split(r"(\[[^\]]*\])", item)
        choices = [_expand_range(p[1:-1], nodelist) if p.startswith("[") else [p] for p in parts if p]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    items, depth, current = [], 0, ""
    for ch in nodelist.strip():
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    return [i for i in items if i]


def _expand_range(spec: str, nodelist: str) -> list[str]:
    out = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise LaunchError(f"cannot read the Slurm node list {nodelist!r} (range {part!r})")
        out += [f"{n:0{len(first)}d}" for n in range(int(first), int(last or first) + 1)]
    return out


def slurm_hosts(nodelist: str) -> list[str]:
    """The hosts of a Slurm node list, via `scontrol show hostnames` (Slurm's own reading, a local
    operation) when it is there, else :func:`expand_hostlist`."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    return expand_hostlist(nodelist)


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
        # the deepspeed launcher's workers also carry CROSS_RANK / CROSS_SIZE; torchrun's, TORCHELASTIC_RUN_ID
        launcher = "deepspeed" if "CROSS_RANK" in env and "TORCHELASTIC_RUN_ID" not in env else "torchrun"
        # torchrun says LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
        local_world = _int(env, "LOCAL_WORLD_SIZE", _int(env, "LOCAL_SIZE", 0))
        return DistEnv(_int(env, "RANK"), world, _int(env, "LOCAL_RANK", 0), env.get("MASTER_ADDR", "127.0.0.1"),
                       _int(env, "MASTER_PORT", 29500), launcher, local_world_size=local_world)
    ntasks = _int(env, "SLURM_NTASKS", _int(env, "SLURM_NPROCS", 1))
    if "SLURM_PROCID" in env and ntasks > 1:
        # the step's hosts, not the allocation's: `srun -N1` inside a two-node job runs on one of them
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        hosts = tuple(slurm_hosts(nodelist)) if nodelist else ()
        addr = env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1")
        # the port depends on the job: two jobs sharing a host do not collide, a requeued job gets its own back
        port = _int(env, "MASTER_PORT", 10000 + _int(env, "SLURM_JOB_ID", 0) % 50000)
        host = env.get("SLURMD_NODENAME", "")
        counts = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "")
        local_world = counts[hosts.index(host)] if host in hosts and len(counts) == len(hosts) else 0
        gpus = _int(env, "SLURM_GPUS_ON_NODE", -1)
        return DistEnv(_int(env, "SLURM_PROCID"), ntasks, _int(env, "SLURM_LOCALID", 0), addr, port, "srun",
                       hosts=hosts, host=host, local_world_size=local_world, gpus_on_node=None if gpus < 0 else gpus)
    if ntasks > 1 and "SLURM_STEP_ID" not in env:
        raise LaunchError(f"this Slurm allocation has SLURM_NTASKS={ntasks} tasks but the trainer was not started "
                          f"by srun (no SLURM_PROCID): run `srun python -m nbp_ds.train ...` (see slurm/train.sbatch)")
    return DistEnv(0, 1, 0, "127.0.0.1", _int(env, "MASTER_PORT", 29500), "single")


def tasks_per_node(spec: str) -> list[int]:
    """Slurm's compact task counts per node, expanded in node order: "2(x3),1" -> [2, 2, 2, 1]; "" -> []."""
    counts = []
    for part in filter(None, spec.split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise LaunchError(f"cannot read Slurm's tasks per node {spec!r} (expected e.g. 2(x3),1)")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


# ---- gloo's network interface ----------------------------------------------------------------------
SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def interface_address(name: str) -> str | None:
    """The IPv4 address of a network interface (Linux), None when it has none."""
    import fcntl  # local: POSIX only, and only the interface lookup needs it

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            reply = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(reply[20:24])


def interface_towards(hosts: Iterable[str]) -> tuple[str, str] | None:
    """(interface, host): the network interface this machine reaches the first reachable of ``hosts``
    through, found by asking the kernel's routing table (a UDP connect sends nothing). Hosts whose
    name does not resolve, or resolves to this machine, are passed over. None when none is left or
    this is not Linux."""
    if not sys.platform.startswith("linux"):
        return None
    for host in hosts:
        try:
            addr = socket.gethostbyname(host)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((addr, 9))
                local = s.getsockname()[0]
        except OSError:
            continue
        if ipaddress.ip_address(addr).is_loopback or ipaddress.ip_address(local).is_loopback:
            continue
        for _, name in socket.if_nameindex():
            if interface_address(name) == local:
                return name, host
    return None


def choose_gloo_interface(dist_env: DistEnv, environ: dict | None = None) -> str | None:
    """Set GLOO_SOCKET_IFNAME to the interface that reaches the job's other hosts, unless it is set.

    Left alone, gloo binds to the address this machine's own hostname resolves to and tells its
    peers to connect there. Where /etc/hosts names the host at 127.0.1.1 (Debian and Ubuntu do) the
    peers are sent to their own loopback ("Gloo connectFullMesh failed ... Connection refused,
    remote=[127.0.1.1]"); where it resolves to an interface the others cannot reach (a management
    network, a container bridge) they wait until the timeout. The route to a peer host is the one
    interface known to work. Returns the interface chosen, or None (one host, already set, not found)."""
    environ = os.environ if environ is None else environ
    if not dist_env.peers or environ.get("GLOO_SOCKET_IFNAME"):
        return None
    found = interface_towards(dist_env.peers)
    if found is None:
        log.warning("could not find the network interface towards %s: gloo picks one by this host's name "
                    "(set GLOO_SOCKET_IFNAME if the ranks cannot connect)", ", ".join(dist_env.peers[:3]))
        return None
    environ["GLOO_SOCKET_IFNAME"] = found[0]
    log.info("GLOO_SOCKET_IFNAME=%s: the interface towards %s", found[0], found[1])
    return found[0]


def export_for_torch(dist_env: DistEnv) -> None:
    """Set the variables torch.distributed's env:// rendezvous and gloo read."""
    os.environ.update({"RANK": str(dist_env.rank), "WORLD_SIZE": str(dist_env.world_size),
                       "LOCAL_RANK": str(dist_env.local_rank), "MASTER_ADDR": dist_env.master_addr,
                       "MASTER_PORT": str(dist_env.master_port)})
    choose_gloo_interface(dist_env)


def hostname() -> str:
    """This machine's short host name (what Slurm node lists use)."""
    return socket.gethostname().split(".")[0]
