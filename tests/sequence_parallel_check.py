"""The check that DeepSpeed-Ulysses equals one rank (nbp_ds.model.sequence_parallel), run by two processes: gloo on
the CPU (tests/test_sequence_parallel.py) or NCCL on two GPUs (tests/test_gpu_sequence_parallel.py)."""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist

from nbp_ds.config import load_config
from nbp_ds.layout import Layout
from nbp_ds.model import build_model
from nbp_ds.model.attention import DeviceBackend
from nbp_ds.model.sequence_parallel import SequenceShard, UlyssesAttention
from nbp_ds.train.engine import init_deepspeed_comm

# fp32 on the CPU: the sharded path runs the same kernels on the same numbers in another order (the all-to-alls
# move values exactly; the loss and gradient sums over ranks reassociate), so agreement is to rounding
ATOL, RTOL = 2e-6, 1e-5
# on a GPU the backend is the one training uses there (auto: FlexAttention, compiled layers), whose tiles and
# reductions differ between 49 and 50 positions: agreement to fp32 kernel rounding
GPU_ATOL, GPU_RTOL = 1e-4, 1e-4


def join_pair(rank: int, store: str, backend: str) -> tuple[dist.ProcessGroup, torch.device]:
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the comparison
    dist.init_process_group(backend, store=dist.FileStore(store, 2), rank=rank, world_size=2)
    init_deepspeed_comm(backend)  # as the trainer does: no op compiled on the CPU
    return dist.new_group([0, 1]), device


def equality_worker(rank: int, store: str, backend: str = "gloo") -> None:
    """Both processes: the attention (padding included) and the tiny model, sequence-parallel over the two, against
    the same computation on one rank; raises on a difference."""
    group, device = join_pair(rank, store, backend)
    attention, (atol, rtol) = ("sdpa", (ATOL, RTOL)) if device.type == "cpu" else ("auto", (GPU_ATOL, GPU_RTOL))
    # tiny: 49 positions (odd, so the second rank's shard ends with one padded position), 4 heads, blocks of 4
    cfg = load_config("tiny", [f"model.attention={attention}", "model.class_dropout=0"])
    layout = Layout.from_config(cfg.layout, cfg.model.vocab_size)
    assert layout.seq_len % 2 == 1
    head_dim = cfg.model.d_model // cfg.model.n_head
    backend = DeviceBackend(attention, layout, head_dim)
    gen = torch.Generator().manual_seed(7)  # the same numbers on both ranks
    q, k, v, g = (torch.randn(3, cfg.model.n_head, layout.seq_len, head_dim, generator=gen).to(device)
                  for _ in range(4))

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
        torch.testing.assert_close(have[:, :, :real], want, atol=atol, rtol=rtol, msg=f"rank {rank}: {name}")

    # the model: loss, accuracy, logits and every parameter's gradient summed over the group
    torch.manual_seed(0)
    model = build_model(cfg, device=device)
    sharded = copy.deepcopy(model)
    sharded.enable_sequence_parallel(group)
    tokens = torch.randint(0, cfg.model.vocab_size, (3, *layout.grid), generator=gen)
    batch = {"tokens": tokens.to(device), "label": torch.tensor([0, 2, 3], device=device)}
    loss, metrics = model.loss(batch)
    loss.backward()
    loss_sp, metrics_sp = sharded.loss(batch)
    loss_sp.backward()
    torch.testing.assert_close(loss_sp.detach(), loss.detach(), atol=atol, rtol=rtol)
    torch.testing.assert_close(metrics_sp["acc"], metrics["acc"])
    for (name, p), p_sp in zip(model.named_parameters(), sharded.parameters(), strict=True):
        grad = p_sp.grad.clone()
        dist.all_reduce(grad, group=group)
        grad /= 2  # ZeRO-3 averages gradients over every process of the data x sequence group
        torch.testing.assert_close(grad, p.grad, atol=atol, rtol=rtol, msg=f"rank {rank}: gradient of {name}")
    with torch.no_grad():
        torch.testing.assert_close(sharded.logits(batch), model.logits(batch), atol=atol, rtol=rtol)
    leave_pair()


def leave_pair() -> None:
    # without the interpreter's shutdown: the gloo threads DeepSpeed's groups keep alive make it wait minutes
    # (nbp_ds.runtime.distributed.end_launched_process says why the trainer ends the same way)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)
