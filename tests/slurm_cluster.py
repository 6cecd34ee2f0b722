"""A throw-away Slurm cluster for tests: munged, slurmctld and one slurmd per node, started as this
process' children from a configuration in a temporary folder.

    with SlurmCluster(tmp_dir) as cluster:               # one node: this machine, on the loopback address
        job = cluster.sbatch(["slurm/train.sbatch", "train.steps=2"], env={...})
        cluster.wait_done(job)
    with SlurmCluster(tmp_dir, nodes=2) as cluster:      # node1 and node2, each in a network namespace
        ...

With several nodes each slurmd runs on a host of its own (tests/virtual_hosts.py: a network namespace
with its own address, hostname and hosts file); slurmctld and munged run on node1, and the client
commands (sbatch, squeue, scontrol, scancel) are run there too, as on a login node. munged's socket and
key, the spool folders and the jobs' files all live in the shared file system, as on a real cluster.
A machine that cannot make network namespaces (not root, no iproute2) skips multi-node tests.

Nothing outside the folder is written but the namespaces' hosts files (/etc/netns/<namespace>/hosts,
removed again): every path Slurm and munge would default to (/etc/slurm, /run/munge,
/var/spool/slurmd, /var/log) is redirected into the folder, and client commands find the
configuration through ``SLURM_CONF`` (see :meth:`SlurmCluster.env`). Debian's ``slurm-wlm`` and
``munge`` are installed with apt-get when ``slurmctld`` is missing and this process is root;
otherwise the tests are skipped. Runs as root with SlurmUser=root: the daemons and the jobs all run
as this user.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import virtual_hosts
from tests.system_packages import ensure_programs
from tests.virtual_hosts import Host, VirtualHosts

PACKAGES = ("slurm-wlm", "munge")
# squeue states of a job that is not over yet (pending, running, completing, requeued, ...)
QUEUED_STATES = "PD,R,CG,S,RQ,RS,RF,CF,SE"


def ensure_installed() -> None:
    """Install slurm-wlm and munge if absent, or skip the calling test with the reason."""
    ensure_programs(("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol"), PACKAGES, "Slurm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """munged + slurmctld + ``nodes`` slurmd, no GPUs.

    One node is this machine on the loopback address with all its CPUs. Several nodes are hosts
    node1..nodeN on a private network (tests/virtual_hosts.py), each declaring ``cpus_per_node``
    CPUs (default 2) whatever this machine has, so jobs are placed the same way everywhere.
    """

    def __init__(self, folder: Path, nodes: int = 1, cpus_per_node: int | None = None, start_timeout: float = 60):
        if nodes < 1:
            raise ValueError(f"nodes={nodes}: a cluster needs at least one node")
        self.dir = Path(folder)
        self.nodes = nodes
        self.network = VirtualHosts(nodes) if nodes > 1 else None
        self.hosts: list[Host] = self.network.hosts if self.network else [virtual_hosts.this_machine()]
        self.cpus_per_node = cpus_per_node or (2 if self.network else os.cpu_count() or 1)
        self.start_timeout = start_timeout
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        # set once the network's start is attempted: a cluster skipped before (no Slurm, no namespaces) has
        # nothing to tear down, and tearing down without iproute2 would turn the skip into an error
        self.network_started = False

    @property
    def node_names(self) -> list[str]:
        return [h.name for h in self.hosts]

    @property
    def head(self) -> Host:
        """The host of slurmctld and munged, where client commands run."""
        return self.hosts[0]

    # ---- configuration ----------------------------------------------------------------------
    def write_config(self) -> None:
        d = self.dir
        for sub in ("munge", "state", "spool", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        for name in self.node_names:
            (d / "spool" / name).mkdir(exist_ok=True)
        # munged refuses a socket directory others may write to, and a key readable by others
        os.chmod(d / "munge", 0o700)
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        lines = {
            "ClusterName": "nbptest",
            "SlurmctldHost": f"{self.head.name}({self.head.addr})",
            "SlurmctldPort": free_port(),
            "SlurmdPort": free_port(),  # the same on every node: each slurmd listens on its own address
            "SlurmUser": "root",
            "SlurmdUser": "root",
            # the socket of *our* munged, not the system's /run/munge one; cred_expire (default 120 s)
            # is also how long a requeued job is held (Reason=BeginTime) before it may start again
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket},cred_expire=10",
            "StateSaveLocation": d / "state",
            # %n: the node name, so that several slurmd on one file system keep apart
            "SlurmdSpoolDir": d / "spool" / "%n",
            "SlurmctldPidFile": d / "slurmctld.pid",
            "SlurmdPidFile": d / "slurmd-%n.pid",
            "SlurmctldLogFile": d / "log" / "slurmctld.log",
            "SlurmdLogFile": d / "log" / "slurmd-%n.log",
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            # the CPUs declared below count, not this machine's: nodes sharing it each declare a few
            "SlurmdParameters": "config_overrides",
            # no cgroups (containers rarely allow them): track processes by /proc. task/affinity binds a task to
            # its CPUs (sched_setaffinity) when asked (--cpu-bind, SLURM_CPU_BIND), so a test can read the cores a
            # task was given; nothing is bound by default (None), so the other jobs run as before on a few cores
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/affinity",
            "TaskPluginParam": "None",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_CPU",  # memory is not a consumable: jobs need not ask for any
            "SchedulerType": "sched/backfill",
            # look at pending jobs every 2 s, not every 30 / 60 s: a requeued job starts as soon as it may
            "SchedulerParameters": "bf_interval=2,sched_interval=2",
            "MpiDefault": "none",
            "JobRequeue": 1,
            "ReturnToService": 2,
            "KillWait": 5,  # seconds between SIGTERM and SIGKILL when a job is cancelled
            "MinJobAge": 600,  # keep finished jobs visible to `scontrol show job` for the asserts
            "InactiveLimit": 0,
            "SlurmdTimeout": 60,
            "PlugStackConfig": d / "plugstack.conf",  # empty: no SPANK plugins from /etc/slurm
        }
        (d / "plugstack.conf").write_text("")
        text = "\n".join(f"{k}={v}" for k, v in lines.items()) + "\n"
        for host in self.hosts:
            text += (f"NodeName={host.name} NodeAddr={host.addr} CPUs={self.cpus_per_node} RealMemory=1000 "
                     "State=UNKNOWN\n")
        text += f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP " \
                "OverSubscribe=NO\n"
        self.conf.write_text(text)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for client commands (sbatch, squeue, scontrol) and the jobs they submit."""
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    # ---- daemons ----------------------------------------------------------------------------
    def _spawn(self, name: str, host: Host, cmd: list[str]) -> None:
        log = open(self.dir / "log" / f"{name}.out", "w")
        # own session: a Ctrl-C to pytest does not reach the daemons before teardown stops them.
        # Host.wrap only execs (nsenter, unshare, sh's exec): the pid is the daemon's own.
        self.procs[name] = subprocess.Popen(host.wrap(cmd), env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        log.close()

    def start(self) -> SlurmCluster:
        ensure_installed()
        if self.network:
            reason = virtual_hosts.unavailable()
            if reason:
                pytest.skip(f"a {self.nodes}-node Slurm cluster needs network namespaces: {reason}")
            try:
                self.network_started = True
                self.network.start()
            except virtual_hosts.NamespacesUnavailable as exc:
                pytest.skip(f"a {self.nodes}-node Slurm cluster needs network namespaces: {exc}")
        self.write_config()
        m = self.dir / "munge"
        self._spawn("munged", self.head,
                    ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                     f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                     f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"])
        self._wait(lambda: self.munge_socket.exists(), "munged to create its socket")
        self._spawn("slurmctld", self.head, ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.run(["scontrol", "ping"]).stdout.count("UP") > 0, "slurmctld to answer")
        for host in self.hosts:
            # -N: the node this slurmd is (it would otherwise go by `hostname -s`)
            self._spawn(f"slurmd-{host.name}", host, ["slurmd", "-D", "-N", host.name, "-f", str(self.conf)])
        self._wait(self._nodes_ready, f"nodes {','.join(self.node_names)} to become idle")
        return self

    def _nodes_ready(self) -> bool:
        rows = (line.split() for line in self.run(["sinfo", "-h", "-N", "-o", "%N %T"]).stdout.splitlines())
        states = {row[0]: row[1] for row in rows if len(row) == 2}
        for name in self.node_names:
            if states.get(name, "").startswith(("down", "drain")):
                # an earlier registration failure leaves the node down: ReturnToService=2 normally
                # clears it, this covers a slurmd that registered before the controller was ready
                self.run(["scontrol", "update", f"NodeName={name}", "State=RESUME"])
        return all(states.get(name, "").startswith("idle") for name in self.node_names)

    def run(self, cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        """A client command (scontrol, squeue, scancel, ...) on the head node, against this cluster."""
        return subprocess.run(self.head.wrap(cmd), env=self.env(), capture_output=True, text=True, timeout=timeout)

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.time() + self.start_timeout
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}:\n"
                                       + self.logs())
            if ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"timed out after {self.start_timeout} s waiting for {what}:\n" + self.logs())

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for f in sorted((self.dir / "log").glob("*")) + [self.dir / "munge" / "munged.log"]:
            if f.is_file():
                parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel what is still queued or running, stop our daemons by pid (controller last), then
        take the network down, which kills whatever still runs on its hosts."""
        try:
            if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
                # SLURM_CONF points at our controller: this cancels only this cluster's jobs
                self.run(["scancel", f"--user={os.geteuid()}"])
                deadline = time.time() + 20
                while time.time() < deadline and self.run(["squeue", "-h"]).stdout.strip():
                    time.sleep(0.5)
            slurmds = [name for name in self.procs if name.startswith("slurmd-")]
            for name in [*slurmds, "slurmctld", "munged"]:
                proc = self.procs.pop(name, None)
                if proc is None or proc.poll() is not None:
                    continue
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            if self.network and self.network_started:
                self.network.stop()

    def __enter__(self) -> SlurmCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- jobs -------------------------------------------------------------------------------
    def sbatch(self, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """Submit from the head node; return the job id. sbatch exports its whole environment to the
        job (--export=ALL)."""
        done = subprocess.run(self.head.wrap(["sbatch", "--parsable", *args]), env=self.env(**(env or {})),
                              cwd=cwd, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed ({done.returncode}): {done.stderr}")
        return done.stdout.strip().split(";")[0]

    def records(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job` as one dict per job (one per array task); empty once forgotten."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return [dict(re.findall(r"(\w[\w:/]*)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def job_info(self, job_id: str) -> dict[str, str]:
        """The job's record (an array's first task); empty once the controller has forgotten it."""
        records = self.records(job_id)
        return records[0] if records else {}

    def array_states(self, job_id: str) -> list[str]:
        return [r.get("JobState", "?") for r in self.records(job_id)]

    def queued(self, job_id: str) -> bool:
        """Is the job (or an array task of it) still pending, running or completing?"""
        return bool(self.run(["squeue", "-h", "-j", job_id, "-t", QUEUED_STATES, "-o", "%T"]).stdout.strip())

    def signal_batch(self, job_id: str, sig: str) -> None:
        """Send a signal to the job's batch shell only (what --signal=B:USR1@300 does before the time limit)."""
        done = self.run(["scancel", "--batch", f"--signal={sig}", job_id])
        if done.returncode != 0:
            raise RuntimeError(f"scancel --batch --signal={sig} {job_id} failed: {done.stderr}")

    def describe(self, job_id: str, tail: int = 6000) -> str:
        """What to print when an assert fails: the job's records and the end of its log(s)."""
        parts = []
        for record in self.records(job_id):
            parts.append(f"job {record.get('JobId')}: " + " ".join(f"{k}={v}" for k, v in record.items()))
            log = Path(record.get("StdOut", ""))
            if log.is_file():
                parts.append(f"--- {log} (end)\n{log.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts) or f"job {job_id}: no record"

    def wait_for(self, job_id: str, ready: Callable[[], bool], what: str, timeout: float = 300,
                 poll: float = 0.5) -> None:
        """Poll until ready() is true; fail, with the job's records and log, when the job leaves the
        queue first or the time runs out. The one polling loop of the Slurm tests."""
        deadline = time.time() + timeout
        while True:
            queued = self.queued(job_id)  # asked first: a condition met as the job ends still counts
            if ready():
                return
            if not queued:
                raise AssertionError(f"job {job_id} left the queue before {what}\n{self.describe(job_id)}")
            if time.time() > deadline:
                raise AssertionError(f"no {what} within {timeout} s\n{self.describe(job_id)}\n{self.logs()}")
            time.sleep(poll)

    def wait_done(self, job_id: str, timeout: float = 300) -> None:
        """Wait for the job (every task of an array) to leave the queue, whatever its end."""
        self.wait_for(job_id, lambda: not self.queued(job_id), f"end of job {job_id}", timeout, poll=1.0)
