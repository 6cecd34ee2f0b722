"""Context parallelism (DeepSpeed-Ulysses, train.sequence_parallel): two real gloo processes on the CPU give the
single-rank attention and model, forward and gradients; a two-process ZeRO-3 run with it resumes exactly;
head counts the group cannot split are refused by name."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from train_helpers import make_shards, run, step_losses, train_cmd

from nbp_ds.config import load_config
from nbp_ds.errors import ConfigError
from nbp_ds.layout import Layout
from nbp_ds.model import build_model
from nbp_ds.model.attention import DeviceBackend
from nbp_ds.model.sequence_parallel import SequenceShard, UlyssesAttention, data_parallel_share
from nbp_ds.train.ds_config import build_ds_config

# fp32 on the CPU: the sharded path runs the same kernels on the same numbers in another order (the all-to-alls
# move values exactly; the loss and gradient sums over ranks reassociate), so agreement is to rounding
ATOL, RTOL = 2e-6, 1e-5


def _join(rank: int, store: str) -> dist.ProcessGroup:
    import deepspeed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    return dist.new_group([0, 1])


def _attention_worker(rank: int, store: str) -> None:
    group = _join(rank, store)
    # tiny: 49 positions (odd, so the second rank's shard ends with one padded position), 4 heads, blocks of 4
    cfg = load_config("tiny", ["model.attention=sdpa", "model.class_dropout=0"])
    layout = Layout.from_config(cfg.layout, cfg.model.vocab_size)
    assert layout.seq_len % 2 == 1
    head_dim = cfg.model.d_model // cfg.model.n_head
    backend = DeviceBackend("sdpa", layout, head_dim)
    gen = torch.Generator().manual_seed(7)  # the same numbers on both ranks
    q, k, v, g = (torch.randn(3, cfg.model.n_head, layout.seq_len, head_dim, generator=gen) for _ in range(4))

    # the reference: the whole sequence on this rank, the backend as single-rank training runs it
    qkv = [t.clone().requires_grad_() for t in (q, k, v)]
    out = backend.full(*qkv)
    ref = [out.detach(), *torch.autograd.grad(out, qkv, g)]

    shard = SequenceShard(layout, group)
    ulysses = UlyssesAttention(backend, shard, cfg.model.n_head)
    local = [shard.split(t, 2).clone().requires_grad_() for t in (q, k, v)]
    real = min(shard.stop, layout.seq_len) - shard.start  # this rank's positions that are not padding
    g_local = shard.split(g, 2).clone()
    g_local[:, :, real:] = 0  # nothing reads the padding's outputs (the model drops them)
    out_local = ulysses.full(*local)
    got = [out_local.detach(), *torch.autograd.grad(out_local, local, g_local)]
    for name, want, have in zip(("output", "dq", "dk", "dv"), ref, got, strict=True):
        want = want[:, :, shard.start:shard.start + real]
        torch.testing.assert_close(have[:, :, :real], want, atol=ATOL, rtol=RTOL, msg=f"rank {rank}: {name}")

    # the model: loss, accuracy, logits and every parameter's gradient summed over the group
    torch.manual_seed(0)
    model = build_model(cfg)
    sharded = copy.deepcopy(model)
    sharded.enable_sequence_parallel(group)
    tokens = torch.randint(0, cfg.model.vocab_size, (3, *layout.grid), generator=gen)
    batch = {"tokens": tokens, "label": torch.tensor([0, 2, 3])}
    loss, metrics = model.loss(batch)
    loss.backward()
    loss_sp, metrics_sp = sharded.loss(batch)
    loss_sp.backward()
    torch.testing.assert_close(loss_sp.detach(), loss.detach(), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(metrics_sp["acc"], metrics["acc"])
    for (name, p), p_sp in zip(model.named_parameters(), sharded.parameters(), strict=True):
        grad = p_sp.grad.clone()
        dist.all_reduce(grad, group=group)
        grad /= 2  # ZeRO-3 averages gradients over every process of the data x sequence group
        torch.testing.assert_close(grad, p.grad, atol=ATOL, rtol=RTOL, msg=f"rank {rank}: gradient of {name}")
    with torch.no_grad():
        torch.testing.assert_close(sharded.logits(batch), model.logits(batch), atol=ATOL, rtol=RTOL)
    _leave()


def _leave() -> None:
    # without the interpreter's shutdown: the gloo threads DeepSpeed's groups keep alive make it wait minutes
    # (nbp_ds.runtime.distributed.end_launched_process says why the trainer ends the same way)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def test_ulysses_attention_and_model_equal_single_rank(tmp_path):
    """Block-causal attention on 2 ranks of a sequence group (padding included) equals the single-rank attention,
    output and dq/dk/dv; the whole model's loss, accuracy and logits equal, its gradients averaged over the group
    (as ZeRO-3 averages them) equal the single-rank gradients."""
    mp.spawn(_attention_worker, args=(str(tmp_path / "store"),), nprocs=2)


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
    through 8 Adam steps)."""
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
