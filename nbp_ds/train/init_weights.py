"""Start a run from exported weights (``train.init_from``): fine-tuning a converted release or an export.

The file is what nbp_ds.train.export writes (nbp-export, nbp-convert-official): a
.safetensors with the run config in its metadata. Its weights must fit the run's model exactly (keys and
shapes), and the settings that give the weights their meaning (architecture, heads, layout and token ids)
must be the run's. Under ZeRO-3 each parameter is gathered, filled on rank 0 and re-partitioned, so no rank
ever holds more than one full parameter at a time.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from nbp_ds.config import ConfigError, RunConfig
from nbp_ds.train.experiment import check_weights_meaning

log = logging.getLogger(__name__)

def load_initial_weights(model: nn.Module, path: str | Path, cfg: RunConfig) -> None:
    """Copy the weights of an exported .safetensors into ``model`` (plain or ZeRO-3 partitioned)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"train.init_from={path}: no such file")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "nbp_ds_config" not in meta:
            raise ConfigError(f"train.init_from={path}: not an nbp_ds export (no nbp_ds_config metadata)")
        check_weights_meaning(json.loads(meta["nbp_ds_config"]), cfg, f"train.init_from={path}",
                              hint=f" (start from the file's own config: --config {path.with_suffix('.json')})")
        params = dict(model.named_parameters())
        missing, unexpected = sorted(set(params) - set(f.keys())), sorted(set(f.keys()) - set(params))
        wrong = [f"{k} {f.get_slice(k).get_shape()} (model {list(_full_shape(p))})" for k, p in params.items()
                 if k in f.keys() and list(f.get_slice(k).get_shape()) != list(_full_shape(p))]
        if missing or unexpected or wrong:
            raise ConfigError(f"train.init_from={path} does not fit the run's model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, shapes {wrong[:5]}")
        writer = not dist.is_initialized() or dist.get_rank() == 0
        for name, param in params.items():
            with _gathered(param):
                if writer or not hasattr(param, "ds_id"):
                    with torch.no_grad():
                        param.data.copy_(f.get_tensor(name).to(param.dtype))
    log.info("initialized %d parameters from %s", len(params), path)


def _full_shape(param: torch.Tensor) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)


def _gathered(param: torch.Tensor):
    """ZeRO-3: the whole parameter on every rank, rank 0's values partitioned again on exit."""
    if not hasattr(param, "ds_id"):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=0)
