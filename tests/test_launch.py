"""nbp_ds.runtime.launch: where a process sits in the job (torchrun, srun, alone), Slurm's host lists,
and the network interface gloo is given when a job spans several hosts."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from nbp_ds.runtime import launch
from nbp_ds.runtime.launch import DistEnv, LaunchError
from tests import virtual_hosts
from tests.train_helpers import ROOT
from tests.virtual_hosts import VirtualHosts

# what srun sets for the second task of `srun --nodes=2 --ntasks-per-node=2` (global rank 3 runs on
# node2 as its second task), in job 4321
SRUN_RANK3 = {"SLURM_JOB_ID": "4321", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4",
              "SLURM_STEP_ID": "0", "SLURM_NODEID": "1", "SLURMD_NODENAME": "node2",
              "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_STEP_NODELIST": "node[1-2]"}


@pytest.fixture
def no_scontrol(monkeypatch):
    """No Slurm client on PATH: host lists are expanded by launch itself."""
    monkeypatch.setenv("PATH", "/nonexistent")


# ---- host lists ------------------------------------------------------------------------------------
HOSTLISTS = {
    "node7": ["node7"],
    "node[1-2]": ["node1", "node2"],
    "gpu[01-03,07],login1": ["gpu01", "gpu02", "gpu03", "gpu07", "login1"],
    "a[8-11]": ["a8", "a9", "a10", "a11"],
    "rack1-n[008-010]": ["rack1-n008", "rack1-n009", "rack1-n010"],
    "r[1-2]n[1-2]": ["r1n1", "r1n2", "r2n1", "r2n2"],
}


@pytest.mark.parametrize("nodelist", sorted(HOSTLISTS))
def test_expand_hostlist(nodelist):
    assert launch.expand_hostlist(nodelist) == HOSTLISTS[nodelist]


@pytest.mark.slurm
def test_expand_hostlist_reads_lists_as_scontrol_does(slurm_installed, tmp_path):
    conf = tmp_path / "slurm.conf"  # scontrol reads a configuration even to expand a host list
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\n")
    for nodelist in HOSTLISTS:
        done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                              env={"SLURM_CONF": str(conf), "PATH": "/usr/bin:/bin"}, timeout=30)
        assert done.returncode == 0, done.stderr
        assert launch.expand_hostlist(nodelist) == done.stdout.split(), nodelist


def test_expand_hostlist_names_a_list_it_cannot_read():
    with pytest.raises(LaunchError, match=r"node\[a-b\]"):
        launch.expand_hostlist("node[a-b]")


# ---- detect: srun --------------------------------------------------------------------------------------
def test_srun_task_on_the_second_host(no_scontrol):
    env = launch.detect(SRUN_RANK3)
    # the global rank comes from SLURM_PROCID, the GPU index from SLURM_LOCALID
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (3, 4, 1, "srun")
    assert (env.master_addr, env.master_port) == ("node1", 10000 + 4321)
    assert env.hosts == ("node1", "node2") and env.host == "node2" and env.peers == ("node1",)


def test_srun_rendezvous_is_on_the_steps_first_host(no_scontrol):
    # `srun --nodelist=node[3-4]` inside a four-node allocation: node1 runs no task of this step
    env = launch.detect({**SRUN_RANK3, "SLURM_JOB_NODELIST": "node[1-4]", "SLURM_STEP_NODELIST": "node[3-4]",
                         "SLURMD_NODENAME": "node4"})
    assert env.master_addr == "node3" and env.peers == ("node3",)


def test_srun_master_from_the_environment_wins(no_scontrol):
    env = launch.detect({**SRUN_RANK3, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "23456"})
    assert (env.master_addr, env.master_port) == ("10.1.2.3", 23456)


def test_srun_port_is_the_jobs_own(no_scontrol):
    ports = {launch.detect({**SRUN_RANK3, "SLURM_JOB_ID": job}).master_port for job in ("1", "2", "50001")}
    assert ports == {10001, 10002}  # 50001 wraps to 1: the range stays 10000..59999


def test_srun_with_one_task_is_a_single_process(no_scontrol):
    env = launch.detect({**SRUN_RANK3, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1"})
    assert (env.rank, env.world_size, env.launcher, env.peers) == (0, 1, "single", ())


def test_srun_bad_values_are_named(no_scontrol):
    with pytest.raises(LaunchError, match="SLURM_LOCALID='x'"):
        launch.detect({**SRUN_RANK3, "SLURM_LOCALID": "x"})


def test_batch_shell_of_a_multi_task_job_is_refused():
    env = {k: v for k, v in SRUN_RANK3.items() if k not in ("SLURM_PROCID", "SLURM_STEP_ID", "SLURM_LOCALID")}
    with pytest.raises(LaunchError, match="not started by srun"):
        launch.detect(env)


def test_torchrun_variables_win_over_slurms():
    env = launch.detect({**SRUN_RANK3, "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0",
                         "MASTER_PORT": "29400"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (5, 8, 1, "h0", "torchrun")


# ---- gloo's interface ------------------------------------------------------------------------------
def own_ipv4_addresses() -> dict[str, str]:
    """{address: interface} of this machine's non-loopback IPv4 addresses, as iproute2 lists them."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=30).stdout
    found = {}
    for line in out.splitlines():
        fields = line.split()
        iface, addr = fields[1], fields[3].split("/")[0]
        if not addr.startswith("127."):
            found[addr] = iface
    return found


@pytest.mark.skipif(not shutil.which("ip") or not sys.platform.startswith("linux"), reason="needs Linux and iproute2")
def test_interface_towards_finds_the_interface_of_the_route():
    addresses = own_ipv4_addresses()
    if not addresses:
        pytest.skip("this machine has no IPv4 address besides loopback")
    addr, iface = next(iter(addresses.items()))
    # unresolvable and loopback hosts are passed over; an address of this machine is reached through its own interface
    assert launch.interface_towards(["no-such-host.invalid", "127.0.0.1", "localhost", addr]) == (iface, addr)
    assert launch.interface_towards(["localhost"]) is None


@pytest.mark.skipif(not shutil.which("ip") or not sys.platform.startswith("linux"), reason="needs Linux and iproute2")
def test_choose_gloo_interface_sets_the_route_unless_told_or_alone():
    addresses = own_ipv4_addresses()
    if not addresses:
        pytest.skip("this machine has no IPv4 address besides loopback")
    addr, iface = next(iter(addresses.items()))
    peer_at_addr = DistEnv(1, 2, 0, addr, 10001, "srun", hosts=(addr, "this-host"), host="this-host")
    environ = {}
    assert launch.choose_gloo_interface(peer_at_addr, environ) == iface and environ == {"GLOO_SOCKET_IFNAME": iface}
    environ = {"GLOO_SOCKET_IFNAME": "ib0"}  # the user's choice stays
    assert launch.choose_gloo_interface(peer_at_addr, environ) is None and environ == {"GLOO_SOCKET_IFNAME": "ib0"}
    alone = DistEnv(1, 2, 1, addr, 10001, "srun", hosts=("this-host",), host="this-host")  # no other host
    environ = {}
    assert launch.choose_gloo_interface(alone, environ) is None and environ == {}


def test_choose_gloo_interface_warns_when_no_route_is_found(caplog):
    env = DistEnv(1, 2, 0, "nowhere", 10001, "srun", hosts=("no-such-host.invalid", "node2"), host="node2")
    environ = {}
    assert launch.choose_gloo_interface(env, environ) is None and environ == {}
    assert "set GLOO_SOCKET_IFNAME" in caplog.text


def test_gloo_interface_on_hosts_that_name_themselves_127_0_1_1():
    """On node2 of a two-host network whose hosts files are written the Debian way, gloo's default
    (the address of the own hostname) is 127.0.1.1; the route to node1 gives eth0."""
    reason = virtual_hosts.unavailable()
    if reason:
        pytest.skip(reason)
    code = ("import os, socket; from nbp_ds.runtime import launch; "
            "env = launch.DistEnv(1, 2, 0, 'node1', 10001, 'srun', hosts=('node1', 'node2'), host='node2'); "
            "print(socket.gethostname(), socket.gethostbyname('node2'), launch.interface_towards(['node2']), "
            "launch.choose_gloo_interface(env), os.environ['GLOO_SOCKET_IFNAME'])")
    with VirtualHosts(2) as net:
        done = subprocess.run(net.hosts[1].wrap([sys.executable, "-c", code]), capture_output=True, text=True,
                              cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["node2", "127.0.1.1", "None", "eth0", "eth0"]
