"""``nbp-train --dry-run``: everything a job would find wrong, found in one process before it waits in a queue.

For a world size given by number (no processes are launched and no process group is joined), :func:`dry_run`

1. resolves the run config and the DeepSpeed JSON for that many ranks (a wrong key, a JSON that contradicts the
   run config, a global batch the ranks cannot make: refused here, as the trainer would refuse them);
2. checks that the training and validation shards exist;
3. builds the model on the meta device: its parameter count, and the memory per rank of its model states under
   ZeRO-2 and ZeRO-3, with and without offload, from DeepSpeed's own estimators
   (``estimate_zero2_model_states_mem_needs``, ``estimate_zero3_model_states_mem_needs``: weights, gradients and
   AdamW states; activations come on top);
4. reads rank 0's first training batch (labels checked against the layout) and takes one optimizer step on it
   on this process's device (nbp_ds.perf.train_step: the trainer's loss, clipping and AdamW, without DeepSpeed);
   a model too large for this machine steps as a one-layer copy of itself (same width, vocabulary and layout),
   and the report says so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from nbp_ds.config import RunConfig
from nbp_ds.data import build_loader, expand_shards, parse_sources
from nbp_ds.errors import ConfigError
from nbp_ds.model import build_model
from nbp_ds.model.transformer import SequenceLayer
from nbp_ds.perf.train_step import build_training

GIB = 2**30
# the step runs the full model when its weights, gradients and AdamW states take at most this share of the free
# memory (the rest is for activations)
STEP_MEMORY_SHARE = 0.5


def config_text(cfg: RunConfig, ds_config: dict[str, Any], world_size: int) -> str:
    """The resolved run config (YAML) and DeepSpeed config (JSON), as ``--print-config`` prints them."""
    return (f"# run config, resolved for {world_size} process{'es' * (world_size != 1)}\n"
            f"{yaml.safe_dump(cfg.to_dict(), sort_keys=False)}"
            f"# DeepSpeed config for {world_size} process{'es' * (world_size != 1)}\n"
            f"{json.dumps(ds_config, indent=2)}\n")


@dataclass
class MemoryEstimate:
    """Model-state memory of one setting: per GPU (each rank) and per node's CPU memory, in bytes."""

    setting: str
    gpu_bytes: int
    cpu_bytes: int


def model_state_memory(total_params: int, largest_unit_params: int, gpus_per_node: int,
                       nodes: int) -> list[MemoryEstimate]:
    """DeepSpeed's estimates for ZeRO-2 and ZeRO-3, without and with offload (ZeRO-3 with zero.Init, as the
    trainer builds it). ``largest_unit_params``: the most parameters ZeRO-3 gathers at once."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    rows = []
    for setting, offload in (("zero2", False), ("zero2 + optimizer offload", True)):
        cpu, gpu = estimate_zero2_model_states_mem_needs(total_params, gpus_per_node, nodes, cpu_offload=offload)
        rows.append(MemoryEstimate(setting, gpu, cpu))
    for setting, offload, offload_params in (("zero3", False, False), ("zero3 + optimizer offload", True, False),
                                             ("zero3 + optimizer and parameter offload", True, True)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total_params, largest_unit_params, gpus_per_node, nodes,
                                                            cpu_offload=offload, cpu_offload_params=offload_params)
        rows.append(MemoryEstimate(setting, gpu, cpu))
    return rows


def ds_setting(ds_config: dict[str, Any]) -> str:
    """Which row of :func:`model_state_memory` a DeepSpeed config is."""
    zero = ds_config.get("zero_optimization", {})
    offload_optimizer = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    offload_param = zero.get("offload_param", {}).get("device", "none") not in ("none", None)
    name = f"zero{int(zero.get('stage', 0))}"
    if offload_optimizer and offload_param and name == "zero3":
        return f"{name} + optimizer and parameter offload"
    return f"{name} + optimizer offload" if offload_optimizer else name


def gathered_unit_params(model: torch.nn.Module) -> int:
    """The most parameters ZeRO-3 gathers at once: a whole transformer layer (one leaf module, see
    nbp_ds.train.engine), or any other module's own parameters."""
    layers = [sum(p.numel() for p in m.parameters()) for m in model.modules() if isinstance(m, SequenceLayer)]
    own = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    return max(layers + own)


def free_memory(device: torch.device) -> int:
    """Bytes this process could still allocate on ``device``."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass
class DryRun:
    """What :func:`dry_run` found: the resolved configs, the model's size, memory estimates and the step taken."""

    cfg: RunConfig
    ds_config: dict[str, Any]
    world_size: int
    gpus_per_node: int
    params: int
    memory: list[MemoryEstimate]
    batch_shape: tuple[int, ...]
    loss: float
    step_s: float
    step_device: str
    stepped_layers: int

    def report(self) -> str:
        nodes = self.world_size // self.gpus_per_node
        this = ds_setting(self.ds_config)
        lines = [f"model: {self.params:,} parameters ({self.params / 1e6:.1f}M)",
                 f"model-state memory for {self.world_size} ranks ({nodes} node{'s' * (nodes != 1)} x "
                 f"{self.gpus_per_node}), DeepSpeed's estimators (activations come on top):",
                 f"  {'setting':<42} {'per GPU':>10} {'CPU per node':>13}"]
        for row in self.memory:
            mark = "   <- this run" if row.setting == this else ""
            lines.append(f"  {row.setting:<42} {_size(row.gpu_bytes):>10} {_size(row.cpu_bytes):>13}{mark}")
        layers = self.cfg.model.n_layer
        copy = "" if self.stepped_layers == layers else (
            f" on a {self.stepped_layers}-layer copy of the model (the {layers}-layer model does not fit here)")
        lines += [f"batch: rank 0's first micro-batch, tokens {list(self.batch_shape)}",
                  f"step: one optimizer step on {self.step_device}{copy}: loss {self.loss:.4f} in {self.step_s:.2f} s",
                  "dry run passed: no process group was started"]
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def dry_run(resolved: RunConfig, ds_config: dict[str, Any], world_size: int, gpus_per_node: int = 8,
            device: torch.device | None = None) -> DryRun:
    """Check a run config for a job of ``world_size`` ranks, ``gpus_per_node`` per node, in this process (see the
    module's text): ``resolved`` and ``ds_config`` as ``nbp_ds.train.ds_config.resolved_configs`` gives them for
    that many ranks (the trainer's own resolution, which this layer below the trainer does not import); a
    ConfigError names the first problem."""
    cfg = resolved
    gpus_per_node = min(gpus_per_node, world_size)
    if world_size % gpus_per_node:
        raise ConfigError(f"--world-size {world_size} is not a whole number of nodes of --gpus-per-node "
                          f"{gpus_per_node}")
    try:
        train_sources = parse_sources(cfg.data.train)
        if cfg.data.val:
            expand_shards(cfg.data.val)
    except FileNotFoundError as exc:
        raise ConfigError(f"data: {exc}") from exc

    meta = build_model(resolved, device="meta")
    params = meta.num_params()
    memory = model_state_memory(params, gathered_unit_params(meta), gpus_per_node, world_size // gpus_per_node)

    tr = resolved.train
    loader = build_loader(train_sources, grid=cfg.layout.grid, batch_size=tr.micro_batch, mode="train", rank=0,
                          world_size=world_size, num_workers=0, seed=tr.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                          retries=cfg.data.retries, retry_backoff=cfg.data.retry_backoff)
    batch = next(iter(loader))
    if cfg.layout.condition == "class":
        meta.layout.check_labels(batch["label"])

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "bf16" if device.type == "cuda" and tr.precision == "bf16" else "fp32"
    stepped = resolved
    if 16 * params > STEP_MEMORY_SHARE * free_memory(device):  # fp32 weights, gradients and two AdamW moments
        stepped = dataclasses.replace(resolved, model=dataclasses.replace(resolved.model, n_layer=1))
    model, optimizer, autocast = build_training(stepped, device, precision)
    batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    began = time.perf_counter()
    with autocast():
        loss, _ = model.loss(batch)
    loss.backward()
    optimizer.step()
    loss_value = float(loss.detach())  # waits for the step
    seconds = time.perf_counter() - began
    if not math.isfinite(loss_value):
        raise ConfigError(f"the dry run's step gave a loss of {loss_value}: check the data and model settings")
    return DryRun(resolved, ds_config, world_size, gpus_per_node, params, memory, tuple(batch["tokens"].shape),
                  loss_value, seconds, str(device), stepped.model.n_layer)
