"""Several hosts on one machine for multi-node tests: one Linux network namespace per host, each with
its own hostname, its own address on a private network (10.218.0.0/24, which exists only inside the
namespaces: this machine's own interfaces and routes are not touched) and a hosts file that names
every host, the way a cluster's nodes name each other.

    with VirtualHosts(2) as net:                       # hosts node1 (10.218.0.1) and node2 (10.218.0.2)
        subprocess.run(net.hosts[1].wrap(["getent", "hosts", "node1"]))

The hosts hang off a bridge in a namespace of their own (a "switch"), each through a veth pair.
``Host.wrap`` runs a command on a host: in its network namespace, with /etc/netns/<namespace>/hosts
bind-mounted over /etc/hosts (as ``ip netns exec`` would) and the host's name as hostname. The file
system is shared, which is what a cluster's shared storage is to its nodes.

Everything is named after this process' pid (``nbptest<pid>-<n>-...``), so parallel runs do not meet, and
``start`` first removes what a crashed earlier run left behind (namespaces whose pid is gone, with
any process still inside them, and their hosts files). Needs root and iproute2; :func:`unavailable`
says why not otherwise.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.processes import alive

PREFIX = "nbptest"
SUBNET = "10.218.0"  # private (RFC 1918); /24, host i at .i
NETNS_ETC = Path("/etc/netns")  # `ip netns exec NS` bind-mounts /etc/netns/NS/* over /etc/*


class NamespacesUnavailable(RuntimeError):
    """This machine refuses to make a network namespace (e.g. root in a container without CAP_SYS_ADMIN)."""


@dataclass(frozen=True)
class Host:
    """One machine of a test cluster: its hostname, address, and network namespace (None: this machine)."""

    name: str
    addr: str
    netns: str | None = None

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` as run on this host: in its network namespace, with its hosts file and hostname.

        What ``ip netns exec`` does for /etc/hosts, done by hand: ip netns exec also mounts a fresh
        /sys, without the cgroup file systems under /sys/fs/cgroup that slurmd refuses to start
        without. The mount and the hostname live in namespaces of the command's own (unshare)."""
        if self.netns is None:
            return list(cmd)
        return ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--uts", "--",
                "sh", "-c", 'mount --bind "$1" /etc/hosts && hostname "$0" && shift && exec "$@"',
                self.name, str(NETNS_ETC / self.netns / "hosts"), *cmd]


def this_machine() -> Host:
    """This machine as the only host, on the loopback address (slurmd names itself by `hostname -s`)."""
    return Host(socket.gethostname().split(".")[0], "127.0.0.1")


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    missing = [tool for tool in ("ip", "nsenter", "unshare") if not shutil.which(tool)]
    if missing:
        return f"{' and '.join(missing)} not found (iproute2, util-linux)"
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _owner_pid(name: str) -> int | None:
    """The pid a namespace or hosts folder of ours is named after (nbptest<pid>-<n>-<host>), else None."""
    head = name.split("-", 1)[0]
    digits = head[len(PREFIX):]
    return int(digits) if name.startswith(PREFIX) and digits.isdigit() else None


def _remove_namespace(netns: str) -> None:
    """SIGKILL whatever still runs in the namespace (by pid), then delete it and its hosts folder.
    Deleting a namespace destroys the veth ends inside it, and with them their peers."""
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=30).stdout.split()
    for pid in map(int, pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 10
    while any(alive(int(p)) for p in pids) and time.time() < deadline:
        time.sleep(0.05)
    if netns in _namespaces():
        _ip("netns", "delete", netns)
    shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)


def remove_leftovers() -> list[str]:
    """Remove the namespaces and hosts folders of earlier runs whose process is gone; return their names."""
    names = set(_namespaces())
    if NETNS_ETC.is_dir():
        names |= {p.name for p in NETNS_ETC.iterdir()}
    stale = sorted(n for n in names if (pid := _owner_pid(n)) is not None and not alive(pid))
    for name in stale:
        _remove_namespace(name)
    _remove_empty_netns_etc()
    return stale


def _remove_empty_netns_etc() -> None:
    try:
        NETNS_ETC.rmdir()  # only when empty: another run's (or the system's) folders stay
    except OSError:
        pass


_instances = itertools.count()


class VirtualHosts:
    """``count`` hosts named node1..nodeN on a private network, torn down by :meth:`stop`."""

    def __init__(self, count: int):
        if not 1 <= count <= 250:
            raise ValueError(f"count={count}: between 1 and 250 hosts")
        tag = f"{PREFIX}{os.getpid()}-{next(_instances)}"  # several networks in one process keep apart
        self.switch = f"{tag}-switch"
        self.hosts = [Host(f"node{i}", f"{SUBNET}.{i}", f"{tag}-node{i}") for i in range(1, count + 1)]

    def hosts_file(self, host: Host) -> str:
        """``host``'s /etc/hosts, written the way Debian and Ubuntu install it: the host's own name at
        127.0.1.1, the other hosts at their addresses. (So a program that binds to the address of
        its own hostname, as gloo does by default, is not reachable from the others.)"""
        others = "".join(f"{h.addr}\t{h.name}\n" for h in self.hosts if h is not host)
        return f"127.0.0.1\tlocalhost\n127.0.1.1\t{host.name}\n{others}"

    def start(self) -> VirtualHosts:
        remove_leftovers()
        try:
            _ip("netns", "add", self.switch)
        except RuntimeError as exc:
            raise NamespacesUnavailable(str(exc)) from exc
        try:
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, host in enumerate(self.hosts, start=1):
                _ip("netns", "add", host.netns)
                # created inside the namespaces: no interface ever appears on this machine itself
                _ip("link", "add", "eth0", "netns", host.netns, "type", "veth", "peer", "name", f"port{i}",
                    "netns", self.switch)
                _ip("-n", self.switch, "link", "set", f"port{i}", "master", "br0", "up")
                _ip("-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
                _ip("-n", host.netns, "link", "set", "eth0", "up")
                _ip("-n", host.netns, "link", "set", "lo", "up")
                folder = NETNS_ETC / host.netns
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "hosts").write_text(self.hosts_file(host))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill what still runs on the hosts, delete the namespaces (and so the veth pairs and the
        bridge) and the hosts files. Safe to call twice, and after a failed start."""
        errors = []
        for netns in [h.netns for h in self.hosts] + [self.switch]:
            try:
                _remove_namespace(netns)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                errors.append(str(exc))
        _remove_empty_netns_etc()
        if errors:
            raise RuntimeError("tearing down the test network failed:\n" + "\n".join(errors))

    def __enter__(self) -> VirtualHosts:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
