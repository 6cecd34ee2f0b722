"""A throw-away one-node Slurm cluster for tests: munged, slurmctld and slurmd started as this
process' children from a configuration in a temporary folder.

    with SlurmCluster(tmp_dir) as cluster:
        job = cluster.sbatch(["slurm/train.sbatch", "train.steps=2"], env={...})
        cluster.wait_done(job)

Nothing outside the folder is written: every path Slurm and munge would default to (/etc/slurm,
/run/munge, /var/spool/slurmd, /var/log) is redirected into it, and client commands find the
configuration through ``SLURM_CONF`` (see :meth:`env`). Debian's ``slurm-wlm`` and ``munge`` are
installed with apt-get when ``slurmctld`` is missing and this process is root; otherwise the tests
are skipped. Runs as root with SlurmUser=root: the daemons and the jobs all run as this user.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

PACKAGES = ("slurm-wlm", "munge")


def ensure_installed() -> None:
    """Install slurm-wlm and munge if absent, or skip the calling test with the reason."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch", "srun")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and cannot be installed here (needs root and apt-get): "
                    f"apt-get install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"installing {' '.join(PACKAGES)} failed: {exc}")
        if done.returncode != 0:
            pytest.skip(f"installing {' '.join(PACKAGES)} failed ({' '.join(cmd)}): {done.stderr[-2000:]}")
    if not shutil.which("slurmctld"):
        pytest.skip("apt-get installed slurm-wlm but slurmctld is still not on PATH")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """munged + slurmctld + slurmd on this host, one node with all CPUs and no GPUs."""

    def __init__(self, folder: Path, start_timeout: float = 60):
        self.dir = Path(folder)
        self.start_timeout = start_timeout
        self.node = socket.gethostname().split(".")[0]  # slurmd identifies itself by `hostname -s`
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}

    # ---- configuration ----------------------------------------------------------------------
    def write_config(self) -> None:
        d = self.dir
        for sub in ("munge", "state", "spool", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses a socket directory others may write to, and a key readable by others
        os.chmod(d / "munge", 0o700)
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        cpus = os.cpu_count() or 1
        lines = {
            "ClusterName": "nbptest",
            "SlurmctldHost": f"{self.node}(127.0.0.1)",
            "SlurmctldPort": free_port(),
            "SlurmdPort": free_port(),
            "SlurmUser": "root",
            "SlurmdUser": "root",
            # the socket of *our* munged, not the system's /run/munge one; cred_expire (default 120 s)
            # is also how long a requeued job is held (Reason=BeginTime) before it may start again
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket},cred_expire=10",
            "StateSaveLocation": d / "state",
            "SlurmdSpoolDir": d / "spool",
            "SlurmctldPidFile": d / "slurmctld.pid",
            "SlurmdPidFile": d / "slurmd.pid",
            "SlurmctldLogFile": d / "log" / "slurmctld.log",
            "SlurmdLogFile": d / "log" / "slurmd.log",
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            # no cgroups (containers rarely allow them): track processes by /proc, bind nothing
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
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
        text = "\n".join(f"{k}={v}" for k, v in lines.items())
        text += (f"\nNodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN"
                 f"\nPartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO\n")
        self.conf.write_text(text)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for client commands (sbatch, squeue, scontrol) and the jobs they submit."""
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    # ---- daemons ----------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.dir / "log" / f"{name}.out", "w")
        # own session: a Ctrl-C to pytest does not reach the daemons before teardown stops them
        self.procs[name] = subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        log.close()

    def start(self) -> SlurmCluster:
        ensure_installed()
        self.write_config()
        m = self.dir / "munge"
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                               f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"])
        self._wait(lambda: self.munge_socket.exists(), "munged to create its socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._run(["scontrol", "ping"]).stdout.count("UP") > 0, "slurmctld to answer")
        self._spawn("slurmd", ["slurmd", "-D", "-N", self.node, "-f", str(self.conf)])
        self._wait(self._node_ready, f"node {self.node} to become idle")
        return self

    def _node_ready(self) -> bool:
        state = self._run(["sinfo", "-h", "-n", self.node, "-o", "%T"]).stdout.strip()
        if state.startswith(("down", "drain")):
            # an earlier registration failure leaves the node down: ReturnToService=2 normally
            # clears it, this covers a slurmd that registered before the controller was ready
            self._run(["scontrol", "update", f"NodeName={self.node}", "State=RESUME"])
        return state.startswith("idle")

    def _run(self, cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout)

    def _wait(self, ready, what: str) -> None:
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
        """Cancel what is still queued or running, then stop our daemons by pid, controller last."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            # SLURM_CONF points at our controller: this cancels only this cluster's jobs
            self._run(["scancel", f"--user={os.geteuid()}"])
            deadline = time.time() + 20
            while time.time() < deadline and self._run(["squeue", "-h"]).stdout.strip():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

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
        """Submit; return the job id. sbatch exports its whole environment to the job (--export=ALL)."""
        done = subprocess.run(["sbatch", "--parsable", *args], env=self.env(**(env or {})), cwd=cwd,
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed ({done.returncode}): {done.stderr}")
        return done.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (empty once the controller has forgotten the job)."""
        out = self._run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(re.findall(r"(\w[\w:/]*)=(\S*)", out.splitlines()[0])) if out.strip() else {}

    def array_states(self, job_id: str) -> list[str]:
        out = self._run(["scontrol", "show", "job", "-o", job_id]).stdout
        return re.findall(r"JobState=(\S+)", out)

    def queued(self, job_id: str) -> bool:
        """Is the job (or an array task of it) still pending, running or completing?"""
        out = self._run(["squeue", "-h", "-j", job_id, "-t", "PD,R,CG,S,RQ,RS,RF,CF,SE", "-o", "%T"]).stdout
        return bool(out.strip())

    def wait_done(self, job_id: str, timeout: float = 300, poll: float = 1.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.queued(job_id):
                return
            time.sleep(poll)
        raise AssertionError(f"job {job_id} still queued after {timeout} s: {self.job_info(job_id)}\n"
                             + self.logs())
