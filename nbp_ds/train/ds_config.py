"""DeepSpeed JSON configs, completed from the run config so that the two never disagree.

The JSON holds what is DeepSpeed's own business (ZeRO stage, buckets, offload, optimizer type);
batch sizes, gradient clipping, precision and the optimizer's hyper-parameters come from the run
config. A JSON that sets one of those to a different value is refused, naming the key; ``"auto"`` there (the
Hugging Face convention) means the run config's value (nbp_ds.train.ds_auto). Single keys of the JSON
are set from the command line with ``deepspeed.set.<dotted JSON path>=value`` (for example
``deepspeed.set.zero_optimization.stage3_prefetch_bucket_size=1e8``); the keys the run config owns are refused
there, with the run config's key to use instead (:data:`OWNED_KEYS`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from nbp_ds.config import RunConfig
from nbp_ds.errors import ConfigError
from nbp_ds.model.sequence_parallel import data_parallel_share
from nbp_ds.train.batch import GlobalBatch, plan_batch
from nbp_ds.train.ds_auto import drop_auto
from nbp_ds.typed_yaml import yaml_number

log = logging.getLogger(__name__)

DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"


def available_ds_configs() -> list[str]:
    """Names of the DeepSpeed configs shipped with the package (zero2, zero3, zero3_offload)."""
    return sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))


def resolve_path(spec: str) -> Path:
    """``deepspeed.config``: a JSON file path, or the name of a shipped config (``zero3``; the older
    ``ds_configs/zero3.json`` form names it too)."""
    path = Path(spec)
    if path.is_file():
        return path
    # a bare name (zero3, zero3.json), or the checkout-relative form of earlier versions (ds_configs/zero3.json)
    if path.parent in (Path("."), Path("ds_configs")) and path.suffix in ("", ".json"):
        shipped = DS_CONFIG_DIR / f"{path.stem}.json"
        if shipped.is_file():
            return shipped
    raise ConfigError(f"deepspeed.config={spec!r}: no such file, and not a shipped config "
                      f"({', '.join(available_ds_configs())})")


def load_ds_json(path: str) -> dict[str, Any]:
    file = resolve_path(path)
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed.config={path!r} is not valid JSON: {exc}") from exc


def _fill(ds: dict, key: str, value: Any, source: str, path: str) -> None:
    if key in ds and ds[key] != value:
        raise ConfigError(f"{path}: '{key}' is {ds[key]!r} but the run config's {source} gives {value!r}; "
                          f"remove it from the JSON (the run config decides)")
    ds[key] = value


# DeepSpeed JSON keys the run config decides (deepspeed.set refuses them): the path, and the run config's say
OWNED_KEYS = {
    "train_batch_size": "train.global_batch (or train.micro_batch x train.grad_accum x processes)",
    "sequence_parallel_size": "train.sequence_parallel",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.grad_accum (derived from train.global_batch when that is set)",
    "gradient_clipping": "train.grad_clip",
    "bf16": "train.precision", "fp16": "train.precision (fp16 is not supported: bf16 or fp32)",
    "optimizer": "train.lr, train.betas and train.weight_decay; the optimizer's type is part of the experiment: "
                 "choose it in the JSON (deepspeed.config)",
    "scheduler": "train.lr, train.warmup_steps and train.min_lr_ratio (warmup + cosine)",
    "checkpoint.load_universal": "nbp-train --universal (chosen by itself when the number of processes changed)",
}


def set_keys(ds: dict[str, Any], overrides: dict[str, Any]) -> list[str]:
    """Set ``deepspeed.set``'s keys in the DeepSpeed config ``ds`` (nested mappings merge, anything else replaces);
    a key the run config owns is refused with the reason. Returns what was set, as ``path = value`` lines."""
    done = []
    for path, value in _leaves(overrides, ""):
        owner = next((OWNED_KEYS[k] for k in OWNED_KEYS if path == k or path.startswith(k + ".")), None)
        if owner is not None:
            raise ConfigError(f"deepspeed.set.{path}: the run config decides this DeepSpeed key, from {owner}")
        *parents, last = path.split(".")
        node = ds
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = _number(value)
        done.append(f"{path} = {node[last]!r}")
    return done


def _leaves(tree: dict[str, Any], prefix: str):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _number(value: Any) -> Any:
    """YAML 1.1 reads 5e8 (no dot) as a string, and DeepSpeed's sizes are integers: 5e8 -> 500000000."""
    value = yaml_number(value)
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1:
        return int(value)
    return value


def build_ds_config(cfg: RunConfig, world_size: int, batch: GlobalBatch | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for this run and data-parallel world size: the JSON ``deepspeed.config`` names,
    ``deepspeed.set``'s keys over it, then the run config's batch (``batch``, as the trainer worked it out; by
    default planned here from the run config), clipping, precision and optimizer settings."""
    path = cfg.deepspeed.config
    ds = copy.deepcopy(load_ds_json(path))
    for line in set_keys(ds, cfg.deepspeed.set):
        log.info("DeepSpeed config: %s (deepspeed.set)", line)
    drop_auto(ds, path)  # "auto": filled below from the run config, as a key the JSON leaves out
    tr = cfg.train
    batch = batch or plan_batch(tr, world_size, cfg.data.pack_tokens)
    if batch.processes != world_size:
        raise ValueError(f"a batch planned for {batch.processes} processes given for {world_size}")
    _fill(ds, "train_micro_batch_size_per_gpu", batch.micro_batch, "train.micro_batch", path)
    _fill(ds, "gradient_accumulation_steps", batch.grad_accum, "train.grad_accum", path)
    _fill(ds, "train_batch_size", batch.samples, f"train.micro_batch x train.grad_accum x {world_size} processes",
          path)
    _fill(ds, "gradient_clipping", tr.grad_clip, "train.grad_clip", path)
    if tr.sequence_parallel > 1:
        zero = ds.get("zero_optimization", {})
        if zero_stage(ds) != 3 or not zero.get("reduce_scatter", True):
            # the loss's gradient assumes ZeRO-3's reduce-scatter, which averages over every process of the data x
            # sequence group (ZeRO-1/2 and ZeRO-3's all-reduce path divide by the data-parallel processes only)
            raise ConfigError(f"train.sequence_parallel={tr.sequence_parallel} runs on ZeRO-3 with reduce_scatter "
                              f"(deepspeed.config=zero3 or zero3_offload); {path} has stage {zero_stage(ds)}, "
                              f"reduce_scatter={zero.get('reduce_scatter', True)}")
        # read where no mpu is given (zero.Init): the batch is made by world / sequence_parallel_size processes
        _fill(ds, "sequence_parallel_size", tr.sequence_parallel, "train.sequence_parallel", path)
    if "scheduler" in ds:
        raise ConfigError(f"{path}: remove 'scheduler': the LR schedule comes from train.lr / train.warmup_steps / "
                          f"train.min_lr_ratio")
    if "fp16" in ds and ds["fp16"].get("enabled"):
        raise ConfigError(f"{path}: fp16 is not supported (use train.precision=bf16 or fp32)")
    ds.setdefault("bf16", {})["enabled"] = tr.precision == "bf16"
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    for key, value, source in (("lr", tr.lr, "train.lr"), ("betas", list(tr.betas), "train.betas"),
                               ("weight_decay", tr.weight_decay, "train.weight_decay")):
        if key in params and params[key] != value:
            raise ConfigError(f"{path}: optimizer.params.{key} is {params[key]!r} but {source} is {value!r}; "
                              f"remove it from the JSON")
        params[key] = value
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def resolved_configs(cfg: RunConfig, world_size: int) -> tuple[RunConfig, dict[str, Any]]:
    """The run config as it runs on ``world_size`` ranks (accumulation and global batch fixed) and its DeepSpeed
    config; a ConfigError for what the trainer would refuse."""
    if world_size < 1:
        raise ConfigError(f"--world-size must be at least 1, got {world_size}")
    # the data-parallel processes: the ranks of a sequence-parallel group share their batches
    _, data_world = data_parallel_share(0, world_size, cfg.train.sequence_parallel)
    # planned once, as the trainer does, for both configs
    batch = plan_batch(cfg.train, data_world, cfg.data.pack_tokens)
    resolved = dataclasses.replace(cfg, train=batch.applied_to(cfg.train))
    return resolved, build_ds_config(cfg, data_world, batch)
