"""The trainer under the launchers the README documents besides torchrun --standalone and srun: the deepspeed
launcher with a hostfile (what runs on each node of a multi-node job: --no_ssh --node_rank), and torchrun's
multi-node c10d rendezvous, here with two "nodes" of one process each on this host."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from train_helpers import ROOT, env, make_shards

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    make_shards(folder, train=80, val=8)
    return folder


def trainer_args(out, shards) -> list[str]:
    return ["nbp_ds.train", "--config", "tiny", f"data.train={shards / 'train'}", f"data.val={shards / 'val'}",
            f"train.out_dir={out}", "train.steps=2", "train.log_every=1", "train.eval_every=0"]


def ranks_of(out) -> list[dict]:
    return json.loads((out / "sharding.json").read_text())


def test_deepspeed_launcher_with_a_hostfile(shards, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
           "--node_rank", "0", "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--module",
           *trainer_args(out, shards)]
    result = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "--local_rank=1" in result.stdout + result.stderr  # the launcher's argument reached the trainer
    assert [(r["rank"], r["launcher"]) for r in ranks_of(out)] == [(0, "deepspeed"), (1, "deepspeed")]
    assert (out / "finished").is_file()


def test_torchrun_multi_node_rendezvous(shards, tmp_path):
    """Two torchrun agents (--nnodes 2, c10d at one endpoint), as on two nodes: one job of two ranks."""
    out, port = tmp_path / "out", free_port()
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                                "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                                "--rdzv-id", "nbp-test", "--node-rank", str(node), "-m", *trainer_args(out, shards)],
                               cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for node in (0, 1)]
    try:
        outputs = [agent.communicate(timeout=600)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    assert all(a.returncode == 0 for a in agents), "\n".join(o[-3000:] for o in outputs)
    assert sorted(r["rank"] for r in ranks_of(out)) == [0, 1] and all(r["world_size"] == 2 for r in ranks_of(out))
    assert (out / "finished").is_file()
