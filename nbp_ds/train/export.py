"""Consolidate a DeepSpeed (ZeRO-1/2/3) checkpoint into one safetensors file that a single CPU
process can load with ``build_model`` + ``load_state_dict``; the run config travels in the file's
metadata and in a JSON file beside it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from nbp_ds.config import RunConfig
from nbp_ds.files import atomic_output, write_text_atomic
from nbp_ds.model import NBPModel, build_model
from nbp_ds.train.checkpoint import CheckpointError, find_checkpoint, peek_client_config
from nbp_ds.train.experiment import warn_unrecorded_weight_keys

log = logging.getLogger(__name__)


def consolidate(path: str | Path, tag: str | None = None, ema: bool = False
                ) -> tuple[dict[str, torch.Tensor], RunConfig]:
    """Full fp32 state dict and run config of a checkpoint, gathered from every rank's shards: the trained
    weights, or with ``ema`` their moving average (train.ema)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from nbp_ds.train.ema import consolidate as consolidate_ema

    ref = find_checkpoint(path, tag)
    config = peek_client_config(ref)
    if config is None:
        raise CheckpointError(f"{ref.path}: no run config in the checkpoint's client state (not an nbp_ds run?)")
    warn_unrecorded_weight_keys(config, f"checkpoint {ref.path}")
    if ema:
        state = consolidate_ema(ref.path)
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ref.folder), tag=ref.tag)
    return {k: v.contiguous() for k, v in state.items()}, RunConfig.from_dict(config, source=str(ref.path))


def export(path: str | Path, out: str | Path, dtype: str = "fp32", tag: str | None = None, ema: bool = False) -> Path:
    """Write ``out`` (.safetensors) and ``out`` with .json (the run config); ``ema``: the moving average."""
    state, cfg = consolidate(path, tag, ema=ema)
    return save_export(state, cfg, out, dtype)


def save_export(state: dict[str, torch.Tensor], cfg: RunConfig, out: str | Path, dtype: str = "fp32") -> Path:
    """Write a full state dict as ``out`` (.safetensors, the run config in its metadata) and ``out`` with
    .json (the run config), the format ``load_exported`` reads."""
    from safetensors.torch import save_file

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    state = {k: v.to(torch_dtype) for k, v in state.items()}
    out = Path(out)
    with atomic_output(out) as tmp:
        save_file(state, str(tmp), metadata={"nbp_ds_config": json.dumps(cfg.to_dict()), "dtype": dtype})
    write_text_atomic(out.with_suffix(".json"), json.dumps(cfg.to_dict(), indent=1))
    return out


def load_exported(path: str | Path, device: str | torch.device = "cpu", ema: bool = False
                  ) -> tuple[NBPModel, RunConfig]:
    """An exported .safetensors file, or a checkpoint folder (consolidated in memory; with ``ema`` the moving
    average of its weights) -> (model, cfg), the model in eval mode, in fp32."""
    path = Path(path)
    if path.is_file():
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "nbp_ds_config" not in meta:
            raise CheckpointError(f"{path}: not an nbp_ds export (no nbp_ds_config metadata); use nbp-export")
        recorded = json.loads(meta["nbp_ds_config"])
        warn_unrecorded_weight_keys(recorded, str(path))
        cfg = RunConfig.from_dict(recorded, source=str(path))
        state = load_file(str(path), device=str(device))
    else:
        state, cfg = consolidate(path, ema=ema)
    model = build_model(cfg, device=device)  # made where it runs: no full-size copy on the CPU first
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the model of its config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    return model.eval(), cfg
