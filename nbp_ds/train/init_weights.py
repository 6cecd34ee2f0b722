"""Start a run from exported weights (``train.init_from``): fine-tuning a converted release or an export.

The export is what nbp_ds.weights.export writes (nbp-export, nbp-convert-official): a .safetensors with the
run config in its metadata, or the sharded form (nbp-export --shard-size). Its weights must fit the run's
model exactly (keys and shapes), and the settings that give the weights their meaning
(nbp_ds.weights.identity.WEIGHT_KEYS) must be the run's. Under ZeRO-3 each parameter is gathered, filled on
rank 0 and re-partitioned, so no rank ever holds more than one full parameter at a time.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nbp_ds.config import RunConfig
from nbp_ds.errors import ConfigError
from nbp_ds.weights.files import CONFIG_NAME, open_export
from nbp_ds.weights.identity import check_weights_meaning

log = logging.getLogger(__name__)

def load_initial_weights(model: nn.Module, path: str | Path, cfg: RunConfig) -> None:
    """Copy the weights of an export (a .safetensors file, or a sharded export's folder or index) into ``model``
    (plain or ZeRO-3 partitioned), one tensor at a time."""
    path = Path(path)
    try:
        files = open_export(path)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"train.init_from={path}: {exc}") from exc
    config_file = path / CONFIG_NAME if path.is_dir() else path.with_suffix(".json")
    check_weights_meaning(_as_trained_clip_length(files.config, cfg, path), cfg, f"train.init_from={path}",
                          hint=f" (start from the export's own config: --config {config_file})")
    params = dict(model.named_parameters())
    stored = set(files.keys())
    missing, unexpected = sorted(set(params) - stored), sorted(stored - set(params))
    wrong = [f"{k} {files.shape(k)} (model {list(_full_shape(p))})" for k, p in params.items()
             if k in stored and files.shape(k) != list(_full_shape(p))]
    if missing or unexpected or wrong:
        raise ConfigError(f"train.init_from={path} does not fit the run's model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}, shapes {wrong[:5]}")
    writer = not dist.is_initialized() or dist.get_rank() == 0
    for name, param in params.items():
        with _gathered(param):
            if writer or not hasattr(param, "ds_id"):
                with torch.no_grad():
                    param.data.copy_(files.tensor(name).to(param.dtype))
    log.info("initialized %d parameters from %s", len(params), path)


def _as_trained_clip_length(recorded: dict[str, Any], cfg: RunConfig, path: Path) -> dict[str, Any]:
    """The export's recorded config, with the run's number of latent frames when only that differs: fine-tuning
    on longer (or shorter) clips. Nothing in a RoPE model's weights depends on the clip length (the rotary angles
    are computed from each position's (t, h, w), not learned), so the weights mean the same on a longer grid:
    positions t beyond the trained range get rotations the model has not seen, which fine-tuning teaches it.
    A model with learned position embeddings (model.arch=gpt2) has one row per position and is refused."""
    grid = recorded.get("layout", {}).get("grid")
    new = list(cfg.layout.grid)
    if grid is None or list(grid) == new or list(grid[1:]) != new[1:]:
        return recorded  # the same grid, or another frame size: the usual check decides
    if cfg.model.arch != "llama":
        raise ConfigError(f"train.init_from={path}: fine-tuning on another clip length (layout.grid {list(grid)} -> "
                          f"{new}) needs rotary positions (model.arch=llama); model.arch={cfg.model.arch} learns one "
                          f"embedding per position")
    log.info("fine-tuning on %d latent frames from weights trained on %d (layout.grid %s -> %s): rotary positions "
             "t >= %d are new to the model", new[0], grid[0], list(grid), new, grid[0])
    return {**recorded, "layout": {**recorded["layout"], "grid": new}}


def _full_shape(param: torch.Tensor) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)


def _gathered(param: torch.Tensor):
    """ZeRO-3: the whole parameter on every rank, rank 0's values partitioned again on exit."""
    if not hasattr(param, "ds_id"):
        return nullcontext()
    import deepspeed  # local: DeepSpeed takes seconds to import

    return deepspeed.zero.GatheredParameters([param], modifier_rank=0)
