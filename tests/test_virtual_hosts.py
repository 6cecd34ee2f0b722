"""tests/virtual_hosts.py, the hosts of the multi-node Slurm tests: they reach each other by name
over their own network, and nothing of them outlives the test run, not even a run killed midway."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests import virtual_hosts
from tests.train_helpers import ROOT
from tests.virtual_hosts import NETNS_ETC, VirtualHosts, alive

pytestmark = pytest.mark.skipif(bool(virtual_hosts.unavailable()), reason=str(virtual_hosts.unavailable()))


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


# node2 listens on its address; node1 connects to "node2" and says its hostname
LISTEN = ("import socket; s = socket.socket(); s.bind(('10.218.0.2', 7000)); s.listen(); print('ready', flush=True); "
          "c, peer = s.accept(); print(peer[0], c.recv(64).decode())")
CONNECT = ("import socket; c = socket.create_connection(('node2', 7000), timeout=10); "
           "c.sendall(socket.gethostname().encode())")


def test_hosts_reach_each_other_by_name_and_leave_nothing_behind():
    with VirtualHosts(2) as net:
        ours = {h.netns for h in net.hosts} | {net.switch}
        assert ours <= namespaces()
        node1, node2 = net.hosts
        server = subprocess.Popen(node2.wrap([sys.executable, "-c", LISTEN]), stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "ready"
            client = subprocess.run(node1.wrap([sys.executable, "-c", CONNECT]), capture_output=True, text=True,
                                    timeout=30)
            assert client.returncode == 0, client.stderr
            assert server.communicate(timeout=30)[0].split() == ["10.218.0.1", "node1"]
        finally:
            server.kill()
            server.wait()
        # each host names itself at 127.0.1.1 and the other at its address; this machine's own
        # /etc/hosts is untouched
        seen = subprocess.run(node1.wrap(["getent", "hosts", "node1", "node2"]), capture_output=True, text=True,
                              timeout=30).stdout.split()
        assert seen == ["127.0.1.1", "node1", "10.218.0.2", "node2"]
        assert "node2" not in open("/etc/hosts").read()
    assert not ours & namespaces()
    assert not any((NETNS_ETC / name).exists() for name in ours)


def test_leftovers_of_a_killed_run_are_removed():
    """A run killed with SIGKILL (no teardown) leaves namespaces, hosts files and a process on a
    host; the next run's start removes them, and only them."""
    code = ("import subprocess, sys; from tests.virtual_hosts import VirtualHosts; net = VirtualHosts(2).start(); "
            "p = subprocess.Popen(net.hosts[0].wrap(['sleep', '600'])); print(p.pid, flush=True); "
            "import time; time.sleep(600)")
    crashed = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        orphan = int(crashed.stdout.readline())
        tag = f"{virtual_hosts.PREFIX}{crashed.pid}-"
        left = {n for n in namespaces() if n.startswith(tag)}
        assert len(left) == 3 and all((NETNS_ETC / n / "hosts").is_file() for n in left if "node" in n)
    finally:
        crashed.send_signal(signal.SIGKILL)
        crashed.wait()
    assert alive(orphan)  # the "daemon" the killed run started runs on

    with VirtualHosts(1):  # start() removes what the killed run left; this run's own network stays up
        assert not any(n.startswith(tag) for n in namespaces())
        assert not any((NETNS_ETC / n).exists() for n in left)
        assert not alive(orphan)
        assert any(n.startswith(f"{virtual_hosts.PREFIX}{os.getpid()}-") for n in namespaces())
