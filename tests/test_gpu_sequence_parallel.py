"""DeepSpeed-Ulysses on two GPUs (NCCL): the CPU test's equality check, then the time of one sequence-parallel
attention pass (forward + backward, bf16, the 700M preset's layout and heads) against the same pass on one GPU.
``make gpu-check`` runs it as its ``ulysses`` step; a machine with one GPU skips it (NCCL runs one rank per GPU)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sequence_parallel_check import equality_worker, join_pair, leave_pair

from nbp_ds.config import load_config
from nbp_ds.layout import Layout
from nbp_ds.model.attention import DeviceBackend
from nbp_ds.model.sequence_parallel import SequenceShard, UlyssesAttention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                  reason="Ulysses over NCCL needs 2 GPUs (one rank per GPU)")]


def _timed(fn, repeats: int = 10) -> float:
    """Median milliseconds of ``fn`` on the GPU, after two warm-up calls (compilation)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def _timing_worker(rank: int, store: str) -> None:
    group, device = join_pair(rank, store, "nccl")
    cfg = load_config("ucf101-700m")
    layout = Layout.from_config(cfg.layout, cfg.model.vocab_size)
    heads, head_dim = cfg.model.n_head, cfg.model.d_model // cfg.model.n_head
    backend = DeviceBackend("auto", layout, head_dim)
    shard = SequenceShard(layout, group)
    ulysses = UlyssesAttention(backend, shard, heads)
    batch = 8

    def pass_over(attention, length: int):
        q, k, v = (torch.randn(batch, heads, length, head_dim, device=device, dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))

        def run() -> None:
            attention.full(q, k, v).sum().backward()
        return run

    one = _timed(pass_over(backend, layout.seq_len))
    two = _timed(pass_over(ulysses, shard.local_len))
    if rank == 0:
        print(f"\nulysses attention fwd+bwd, ucf101-700m layout ({layout.seq_len} positions, {heads} heads), batch "
              f"{batch}, bf16, {backend.on(device).name}: one GPU {one:.2f} ms, 2 GPUs sequence-parallel {two:.2f} ms "
              f"per GPU ({torch.cuda.get_device_name(device)})", flush=True)
    dist.barrier()
    leave_pair()


def test_ulysses_equals_one_rank_on_two_gpus(tmp_path):
    mp.spawn(equality_worker, args=(str(tmp_path / "store"), "nccl"), nprocs=2)


def test_ulysses_attention_time_on_two_gpus(tmp_path):
    mp.spawn(_timing_worker, args=(str(tmp_path / "store"),), nprocs=2)
