"""Consolidate a DeepSpeed (ZeRO-1/2/3) checkpoint into one safetensors file that a single CPU
process can load with ``build_model`` + ``load_state_dict``; the run config travels in the file's
metadata and in a JSON file beside it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from nbp_ds.config import RunConfig
from nbp_ds.model import NBPModel, build_model
from nbp_ds.train.checkpoint import peek_client_config, read_latest

log = logging.getLogger(__name__)


def find_checkpoint(path: str | Path, tag: str | None = None) -> tuple[Path, str]:
    """A training output folder, a checkpoints folder, or a tag folder -> (checkpoints folder, tag)."""
    path = Path(path)
    for folder in (path, path / "checkpoints"):
        if (folder / "latest").is_file() or (tag and (folder / tag).is_dir()):
            return folder, tag or read_latest(folder)
    if path.is_dir() and any(path.glob("*model_states.pt")):
        return path.parent, path.name
    raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint here (expected a 'latest' file, a checkpoints/ "
                            f"folder or a tag folder with *model_states.pt)")


def consolidate(path: str | Path, tag: str | None = None) -> tuple[dict[str, torch.Tensor], RunConfig]:
    """Full fp32 state dict and run config of a checkpoint, gathered from every rank's shards."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder, tag = find_checkpoint(path, tag)
    config = peek_client_config(folder, tag)
    if config is None:
        raise FileNotFoundError(f"{folder / tag}: no run config in the checkpoint's client state")
    state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    return {k: v.contiguous() for k, v in state.items()}, RunConfig.from_dict(config, source=str(folder / tag))


def export(path: str | Path, out: str | Path, dtype: str = "fp32", tag: str | None = None) -> Path:
    """Write ``out`` (.safetensors) and ``out`` with .json (the run config)."""
    state, cfg = consolidate(path, tag)
    return save_export(state, cfg, out, dtype)


def save_export(state: dict[str, torch.Tensor], cfg: RunConfig, out: str | Path, dtype: str = "fp32") -> Path:
    """Write a full state dict as ``out`` (.safetensors, the run config in its metadata) and ``out`` with
    .json (the run config), the format ``load_exported`` reads."""
    from safetensors.torch import save_file

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    state = {k: v.to(torch_dtype) for k, v in state.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config_json = json.dumps(cfg.to_dict())
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata={"nbp_ds_config": config_json, "dtype": dtype})
    tmp.replace(out)
    out.with_suffix(".json").write_text(json.dumps(cfg.to_dict(), indent=1))
    return out


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[NBPModel, RunConfig]:
    """An exported .safetensors file, or a checkpoint folder (consolidated in memory) -> (model, cfg),
    the model in eval mode, in fp32."""
    path = Path(path)
    if path.is_file():
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "nbp_ds_config" not in meta:
            raise ValueError(f"{path}: not an nbp_ds export (no nbp_ds_config metadata); use tools/export_weights.py")
        cfg = RunConfig.from_dict(json.loads(meta["nbp_ds_config"]), source=str(path))
        state = load_file(str(path))
    else:
        state, cfg = consolidate(path)
    model = build_model(cfg)
    state = {k: v.float() for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the model of its config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return model.to(device).eval(), cfg
