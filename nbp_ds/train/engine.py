"""Building what trains: the model (under ``deepspeed.zero.Init`` for ZeRO-3, directly on its device),
its parameter groups, the LR schedule and the DeepSpeed engine around them."""

from __future__ import annotations

from typing import Any

import torch

from nbp_ds.config import RunConfig
from nbp_ds.errors import ConfigError
from nbp_ds.model import NBPModel, build_model
from nbp_ds.model.transformer import SequenceLayer
from nbp_ds.runtime.distributed import backend_for
from nbp_ds.runtime.rng import seed_everything
from nbp_ds.runtime.schedule import lr_factor
from nbp_ds.train.ds_config import zero_stage
from nbp_ds.train.init_weights import load_initial_weights


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (embedding, projections, head), not on norm gains (ZeRO-3 aware: a
    partitioned parameter's shape is its ``ds_shape``)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(cfg: RunConfig, ds_config: dict[str, Any], device: torch.device, rank: int,
                 init_from: str | None = None):
    """(engine, model): the model built on ``device`` with identical initial weights on every rank (or the
    weights of the export ``init_from``, for fine-tuning), then a different random stream per data-parallel
    ``rank`` (class dropout; the ranks of one sequence-parallel group share theirs), wrapped by
    ``deepspeed.initialize`` (with DeepSpeed's sequence-parallel groups when ``train.sequence_parallel`` > 1)."""
    import deepspeed  # local: DeepSpeed takes seconds to import

    # DeepSpeed's communication layer wraps the process group nbp_ds.runtime.distributed already joined
    init_deepspeed_comm(backend_for(device))
    tr = cfg.train
    seed_everything(tr.seed)
    stage3 = zero_stage(ds_config) == 3
    # ZeRO partitions over every process (the data x sequence group: DeepSpeed's parallel_state_sp makes one such
    # group of the whole job), which is zero.Init's default group too
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=stage3):
        model: NBPModel = build_model(cfg, device=device)  # compiled layers where model.compile says so
    if init_from:
        load_initial_weights(model, init_from, cfg)
    mpu = sequence_parallel_groups(tr.sequence_parallel)
    if mpu is not None:
        model.enable_sequence_parallel(mpu.get_sequence_parallel_group())
    model.enable_activation_checkpointing(tr.activation_checkpointing)
    if stage3:
        # ZeRO-3 gathers a leaf module's parameters in one hook on the module's own call and puts no hooks
        # inside it: a transformer layer is then one region without hooks, which its compiled code needs
        # (hooks inside would break the graph), and a layer's weights come in one gather instead of seven
        deepspeed.utils.set_z3_leaf_modules(model, [SequenceLayer])
    seed_everything(tr.seed + 1 + rank)

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, tr.steps, tr.warmup_steps, tr.min_lr_ratio))

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, tr.weight_decay),
                                           config=ds_config, lr_scheduler=schedule, mpu=mpu)
    return engine, model


def init_deepspeed_comm(backend: str) -> None:
    """``deepspeed.init_distributed`` over the process group already joined, without DeepSpeed's shared-memory
    all-reduce op (``deepspeed_shm_comm``).

    DeepSpeed's communication layer builds that C++ op whenever the accelerator is the CPU: 30-60 s with the
    node's compiler on the first run in an environment, and in every Slurm job, whose op folder is its own
    (slurm/env.sh). Only DeepSpeed-Inference's tensor-parallel all-reduce (``inference_all_reduce``) calls it;
    ZeRO training's collectives go through torch.distributed (gloo here), so training never uses it. DeepSpeed
    reads which ops this machine can build from ``deepspeed.ops.__compatible_ops__``, one dict per process (probed
    on first use; an edit holds for the process): with the op marked as not buildable, the layer goes on without
    it, as it does on a machine without a compiler."""
    import deepspeed  # local: DeepSpeed takes seconds to import
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def sequence_parallel_groups(size: int):
    """DeepSpeed's sequence-parallel groups (``deepspeed.runtime.sequence_parallel.parallel_state_sp``: groups of
    ``size`` consecutive ranks, one data x sequence group of all ranks), made once per process, as the ``mpu`` that
    ``deepspeed.initialize`` takes for Ulysses; None when ``size`` is 1."""
    if size == 1:
        return None
    from deepspeed.runtime.sequence_parallel import parallel_state_sp  # local: DeepSpeed takes seconds to import

    if parallel_state_sp._SEQUENCE_PARALLEL_GROUP is None:  # a second trainer in one process reuses them
        parallel_state_sp.initialize_sequence_parallel(sequence_parallel_size=size)
    elif parallel_state_sp.get_sequence_parallel_world_size() != size:
        raise ConfigError(f"train.sequence_parallel={size}, but this process already holds sequence-parallel groups "
                          f"of {parallel_state_sp.get_sequence_parallel_world_size()}")
    return parallel_state_sp
