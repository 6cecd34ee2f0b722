"""Context parallelism (DeepSpeed-Ulysses, train.sequence_parallel): two real gloo processes on the CPU give the
single-rank attention and model, forward and gradients; a two-process ZeRO-3 run with it resumes exactly;
head counts the group cannot split are refused by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.multiprocessing as mp
from sequence_parallel_check import equality_worker
from train_helpers import make_shards, run, step_losses, train_cmd

from nbp_ds.config import load_config
from nbp_ds.errors import ConfigError
from nbp_ds.model.sequence_parallel import data_parallel_share
from nbp_ds.train.ds_config import build_ds_config
from nbp_ds.weights.export import consolidate
from nbp_ds.weights.identity import check_same_experiment


def test_ulysses_attention_and_model_equal_single_rank(tmp_path):
    """Block-causal attention on 2 ranks of a sequence group (padding included) equals the single-rank attention,
    output and dq/dk/dv; the whole model's loss, accuracy and logits equal, its gradients averaged over the group
    (as ZeRO-3 averages them) equal the single-rank gradients."""
    mp.spawn(equality_worker, args=(str(tmp_path / "store"),), nprocs=2)


def test_heads_not_divisible_by_group_refused():
    with pytest.raises(ConfigError, match=r"train.sequence_parallel=3 must divide model.n_head=4"):
        load_config("tiny", ["train.sequence_parallel=3"])
    load_config("tiny", ["train.sequence_parallel=2"])  # 4 heads, 2 ranks: fine


def test_data_parallel_share_of_sequence_groups():
    # groups of consecutive ranks (DeepSpeed's parallel_state_sp): ranks 0-1 read one stream, 2-3 the next
    assert [data_parallel_share(r, 4, 2) for r in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert data_parallel_share(5, 6, 3) == (1, 2)
    with pytest.raises(ConfigError, match=r"train.sequence_parallel=2 must divide the number of processes \(3\)"):
        data_parallel_share(0, 3, 2)


def test_sequence_parallel_needs_zero3_reduce_scatter():
    cfg = load_config("tiny", ["train.sequence_parallel=2"])
    assert build_ds_config(cfg, 1)["sequence_parallel_size"] == 2
    for bad in (["deepspeed.config=zero2"], ["deepspeed.set.zero_optimization.reduce_scatter=false"]):
        with pytest.raises(ConfigError, match=r"train.sequence_parallel=2 runs on ZeRO-3 with reduce_scatter"):
            build_ds_config(load_config("tiny", ["train.sequence_parallel=2", *bad]), 1)


@pytest.mark.slow
def test_two_process_sequence_parallel_run_resumes_exactly(tmp_path):
    """ZeRO-3 over the data x sequence group (2 processes, one sequence group): an 8-step run, and the same run
    resumed from its step-4 checkpoint, log the same losses for steps 5-8; both ranks of the group read the same
    batches, so the run follows the one-process run of the same batches (fp32; to 1e-4, rounding compounded
    through 8 Adam steps), and its checkpoint exports to that run's weights."""
    shards = tmp_path / "shards"
    make_shards(shards, train=64, val=8)
    steps = ["train.steps=8", "train.save_every=4", "train.eval_every=0", "train.sequence_parallel=2",
             "train.micro_batch=4", "model.attention=sdpa"]
    straight = tmp_path / "straight"
    result = run(train_cmd(straight, shards, *steps))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "sequence-parallel groups of 2" in result.stderr
    # the same run stopped after step 4: its folder as it was then (checkpoint step 4 latest, logs to step 4)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step00000008")
    (resumed / "checkpoints" / "latest").write_text("step00000004")
    (resumed / "finished").unlink()
    rows = [line for line in (resumed / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 4]
    (resumed / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    result = run(train_cmd(resumed, shards, *steps))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "resumed from" in result.stderr
    a, b = step_losses(straight), step_losses(resumed)
    assert sorted(b) == list(range(1, 9))
    assert [b[s] for s in range(5, 9)] == [a[s] for s in range(5, 9)]
    one = tmp_path / "one_process"
    result = run(train_cmd(one, shards, *steps[:3], *steps[4:], nproc=1))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    c = step_losses(one)
    assert [a[s] for s in range(1, 9)] == pytest.approx([c[s] for s in range(1, 9)], rel=1e-4)
    # its checkpoint exports as any ZeRO-3 checkpoint does: the one-process run's weights
    (sp_weights, _), (one_weights, _) = consolidate(straight), consolidate(one)
    assert sorted(sp_weights) == sorted(one_weights)
    for name, tensor in one_weights.items():
        torch.testing.assert_close(sp_weights[name], tensor, rtol=0, atol=1e-3, msg=name)


def test_another_sequence_parallel_size_is_another_experiment():
    # the saved data position belongs to the data-parallel layout it was read with
    recorded = load_config("tiny").to_dict()
    with pytest.raises(ConfigError, match=r"train.sequence_parallel: 1 -> 2"):
        check_same_experiment(recorded, load_config("tiny", ["train.sequence_parallel=2"]), "run folder")
