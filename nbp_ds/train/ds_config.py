"""DeepSpeed JSON configs, completed from the run config so that the two never disagree.

The JSON holds what is DeepSpeed's own business (ZeRO stage, buckets, offload, optimizer type);
batch sizes, gradient clipping, precision and the optimizer's hyper-parameters come from the run
config. A JSON that sets one of those to a different value is refused, naming the key.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from nbp_ds.config import ConfigError, RunConfig
from nbp_ds.train.batch import resolve_global_batch

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


def build_ds_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for this run and data-parallel world size."""
    path = cfg.deepspeed.config
    ds = copy.deepcopy(load_ds_json(path))
    tr = resolve_global_batch(cfg.train, world_size)
    _fill(ds, "train_micro_batch_size_per_gpu", tr.micro_batch, "train.micro_batch", path)
    _fill(ds, "gradient_accumulation_steps", tr.grad_accum, "train.grad_accum", path)
    _fill(ds, "train_batch_size", tr.micro_batch * tr.grad_accum * world_size,
          f"train.micro_batch x train.grad_accum x {world_size} processes", path)
    _fill(ds, "gradient_clipping", tr.grad_clip, "train.grad_clip", path)
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
