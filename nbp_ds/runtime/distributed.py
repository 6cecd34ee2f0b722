"""The process group and the collectives the trainers use.

Every collective in nbp_ds goes through this module, which puts its tensors on the device the backend
communicates from: the current CUDA device for NCCL (NCCL reduces only CUDA tensors; a CPU tensor
fails with "No backend type associated with device type cpu"), the CPU for gloo. Scalars are packed
into one float64 tensor so a training step costs one reduction, not one per figure.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from nbp_ds.runtime.launch import DistEnv, LaunchError, export_for_torch

OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def process_device(env: DistEnv, name: str = "auto") -> torch.device:
    """The device this process computes on: ``auto`` is its own GPU (:func:`gpu_index`) when there is one, else
    the CPU; ``cuda`` without an index is its own GPU too; anything else as named."""
    if name == "auto":
        return torch.device("cuda", gpu_index(env, torch.cuda.device_count())) if torch.cuda.is_available() \
            else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", gpu_index(env, torch.cuda.device_count()))
    return device


def gpu_index(env: DistEnv, visible: int) -> int:
    """This process' GPU, an index among the ``visible`` devices (CUDA_VISIBLE_DEVICES). When every process of a
    host sees all of the host's GPUs (torchrun, the deepspeed launcher, srun with --gpus-per-node), the local rank
    picks one. When Slurm gives each task only its own (--gpus-per-task=1, --gpu-bind=single:1, a cgroup per
    task), a process sees fewer GPUs than there are tasks on its host though the host has enough: its own are the
    first it sees. Fewer GPUs than local processes is refused (two processes on one GPU fail later, in NCCL)."""
    needed = max(env.local_world_size, env.local_rank + 1)
    if visible >= needed:
        return env.local_rank
    bound_per_task = env.launcher == "srun" and visible >= 1 and (env.gpus_on_node is None
                                                                 or env.gpus_on_node >= needed)
    if bound_per_task:
        return 0
    where = f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}" if "CUDA_VISIBLE_DEVICES" in os.environ \
        else "no CUDA_VISIBLE_DEVICES"
    allocated = f", Slurm allocated {env.gpus_on_node} on this host" if env.gpus_on_node is not None else ""
    raise LaunchError(f"{needed} processes of this job run on this host ({env.launcher}, local rank "
                      f"{env.local_rank}) but this process sees {visible} GPU{'s' * (visible != 1)} ({where}"
                      f"{allocated}): start one process per GPU (torchrun --nproc_per_node {visible}), or give each "
                      f"task its own GPU (srun --gpus-per-task=1, or --gpus-per-node={needed})")


def backend_for(device: torch.device) -> str:
    """The torch.distributed backend for processes computing on ``device``."""
    return "nccl" if device.type == "cuda" else "gloo"


_timeout: timedelta | None = None  # the group's collective timeout, which the control group shares


def init_process_group(env: DistEnv, device: torch.device, timeout_s: float | None = None) -> None:
    """Join the job's process group (env:// rendezvous from the launcher's variables); a no-op when
    already joined. A single process gets a group of one over an in-memory store (no port to bind, so
    single-process runs never collide), and the code paths stay the same.

    ``timeout_s`` bounds every collective (and the rendezvous): a rank whose peer died or hangs raises
    instead of waiting for ever (gloo raises at once; NCCL's watchdog aborts the process), so the job
    ends and can be requeued. None: torch's default (30 min for gloo, 10 for NCCL)."""
    global _timeout
    if dist.is_initialized():
        return
    export_for_torch(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _timeout = timedelta(seconds=timeout_s) if timeout_s else None
    if env.world_size == 1:
        dist.init_process_group(backend_for(device), store=dist.HashStore(), rank=0, world_size=1, timeout=_timeout)
    else:
        dist.init_process_group(backend_for(device), rank=env.rank, world_size=env.world_size, timeout=_timeout)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def collective_device() -> torch.device:
    """The device whose tensors the current backend reduces: CUDA for NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: Sequence[float] | torch.Tensor, op: str = "sum",
               device: torch.device | None = None) -> torch.Tensor:
    """Reduce numbers over all processes: a float64 tensor on ``device`` (default: the backend's own), so
    the caller never chooses a device NCCL cannot use. Tensors on the device are not copied to the host,
    so calling this inside a step does not synchronize with it."""
    device = collective_device() if device is None else device
    tensor = torch.as_tensor(values, dtype=torch.float64).to(device)
    if world_size() > 1:
        dist.all_reduce(tensor, op=OPS[op])
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Every process' ``obj``, in rank order (pickled; for small records such as set-up reports)."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def leave_process_group() -> None:
    """Leave the group in step with the others (a barrier, then teardown). Without it a rank that exits
    first can tear down gloo's threads under a peer, which then aborts although the work is done."""
    global _left_group_of
    if dist.is_initialized():
        world = dist.get_world_size()
        barrier()
        dist.destroy_process_group()
        _left_group_of = world


_left_group_of = 0  # the size of the process group this process left (0: none)


def end_daemonic_children(timeout: float = 5.0) -> None:
    """Terminate and reap this process' daemonic children (DataLoader workers), as the interpreter's exit does.

    ``os._exit`` skips multiprocessing's exit handler, which does this: left alone, a worker notices that its
    parent is gone only at its next status check (every 5 s) and keeps the job's stdout and stderr open until
    then, so whoever reads them (a launcher, a test, a pipe to ``tee``) waits those seconds after every run."""
    children = [child for child in multiprocessing.active_children() if child.daemon]
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout)


def end_launched_process(status: int) -> int:
    """End a rank of a multi-process job that finished and left its group (:func:`leave_process_group`) with
    ``status`` now, without the interpreter's shutdown; any other process gets ``status`` back.

    Why: destroying the group does not stop its backend's threads. The groups DeepSpeed's engine, its ZeRO-3
    parameters and module globals keep (and DDP's reducer) stay alive with gloo's threads running
    (``gloo_tcp_loop``, ``pt_gloo_runloop``) until the interpreter's shutdown frees them, or not, in whatever
    order it meets them, while the peers' sockets close as they exit: now and then (one run in twenty under load)
    a finished rank died there with SIGABRT ("terminate called without an active exception"), and the launcher
    reported the job failed. Everything a run writes is closed and flushed before this point, so the shutdown
    has nothing left to do."""
    if _left_group_of <= 1:
        return status
    end_daemonic_children()
    logging.shutdown()  # flushes every handler
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can be said anyway
            stream.flush()
    os._exit(status)


_control: dist.ProcessGroup | None = None


def control_all_reduce(values: Sequence[float], op: str = "max") -> torch.Tensor:
    """Reduce host-side flags (a stop signal, a skipped step) without touching the GPU: over a gloo group
    on the CPU when the main backend is NCCL, so agreeing on "stop now" every step never waits for the
    GPU to finish its queued work (a device tensor read back on the host would)."""
    global _control
    tensor = torch.as_tensor(values, dtype=torch.float64)
    if world_size() == 1:
        return tensor
    if dist.get_backend() == "gloo":
        dist.all_reduce(tensor, op=OPS[op])
        return tensor
    if _control is None:
        # collective: every rank reaches the first call together
        _control = dist.new_group(backend="gloo", timeout=_timeout)
    dist.all_reduce(tensor, op=OPS[op], group=_control)
    return tensor
