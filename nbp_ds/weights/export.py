"""Consolidate a DeepSpeed (ZeRO-1/2/3) checkpoint into an export that a single CPU process can load with
``build_model`` + ``load_state_dict``: one safetensors file, or shards with an index (the forms of
nbp_ds.weights.files); the run config travels in the metadata and in a JSON file beside the weights."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from nbp_ds.config import RunConfig
from nbp_ds.errors import CheckpointError
from nbp_ds.model import NBPModel, build_model
from nbp_ds.runtime.checkpoint import find_checkpoint, peek_client_config
from nbp_ds.runtime.ema import consolidate as consolidate_ema
from nbp_ds.weights.files import is_export, open_export, write_sharded, write_single
from nbp_ds.weights.identity import warn_unrecorded_weight_keys

log = logging.getLogger(__name__)


def consolidate(path: str | Path, tag: str | None = None, ema: bool = False
                ) -> tuple[dict[str, torch.Tensor], RunConfig]:
    """Full fp32 state dict and run config of a checkpoint, gathered from every rank's shards: the trained
    weights, or with ``ema`` their moving average (train.ema)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # local: slow import

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


def export(path: str | Path, out: str | Path, dtype: str = "fp32", tag: str | None = None, ema: bool = False,
           shard_bytes: int | None = None) -> Path:
    """Write the weights of ``path`` (a checkpoint, or an export in either form: converted to the other) as ``out``:
    one .safetensors file (and .json), or with ``shard_bytes`` the sharded form in the folder ``out``. ``ema``: the
    moving average of a checkpoint's weights. Returns the file written, or the sharded form's index."""
    if is_export(path):
        if ema or tag:
            raise CheckpointError(f"{path} is an export: --ema and --tag choose among a checkpoint's weights")
        files = open_export(path)
        warn_unrecorded_weight_keys(files.config, str(path))
        state, cfg = dict(files.tensors()), RunConfig.from_dict(files.config, source=str(path))
    else:
        state, cfg = consolidate(path, tag, ema=ema)
    return save_export(state, cfg, out, dtype, shard_bytes)


def save_export(state: dict[str, torch.Tensor], cfg: RunConfig, out: str | Path, dtype: str = "fp32",
                shard_bytes: int | None = None) -> Path:
    """Write a full state dict as an export ``load_exported`` reads: ``out`` (.safetensors, the run config in its
    metadata) and ``out`` with .json; with ``shard_bytes``, shards of at most that size with an index and a
    config.json in the folder ``out`` (returns the index's path)."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    state = {k: v.to(torch_dtype).contiguous() for k, v in state.items()}
    if shard_bytes is not None:
        return write_sharded(state, cfg.to_dict(), Path(out), dtype, shard_bytes)
    return write_single(state, cfg.to_dict(), Path(out), dtype)


def load_exported(path: str | Path, device: str | torch.device = "cpu", ema: bool = False
                  ) -> tuple[NBPModel, RunConfig]:
    """An export (a .safetensors file, or a sharded export's folder or index), or a checkpoint folder (consolidated
    in memory; with ``ema`` the moving average of its weights) -> (model, cfg), the model in eval mode, in fp32."""
    path = Path(path)
    if is_export(path):
        try:
            files = open_export(path)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc
        warn_unrecorded_weight_keys(files.config, str(path))
        cfg = RunConfig.from_dict(files.config, source=str(path))
        state = dict(files.tensors(device))
    else:
        state, cfg = consolidate(path, ema=ema)
    model = build_model(cfg, device=device)  # made where it runs: no full-size copy on the CPU first
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the model of its config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    return model.eval(), cfg
