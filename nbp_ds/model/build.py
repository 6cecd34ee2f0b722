"""Building the model a run config describes: the one place that chooses the architecture."""

from __future__ import annotations

import torch

from nbp_ds.config import RunConfig
from nbp_ds.layout import Layout
from nbp_ds.model.execution import compile_enabled
from nbp_ds.model.gpt2 import GPT2Model
from nbp_ds.model.transformer import NBPModel


def build_model(cfg: RunConfig, device: torch.device | str | None = None) -> NBPModel:
    """Build the model a run config describes (``model.arch``: the project's LLaMA-style NBPModel, or the NBP
    authors' GPT-2-style one), with its weights made and initialized directly on ``device`` (default: torch's
    default device; never a full-size copy on the CPU first). Under ``deepspeed.zero.Init`` (ZeRO-3) every
    constructor's parameters are partitioned as they are made. ``model.compile`` decides whether the layers
    are compiled (auto: on a CUDA device); activation checkpointing is the trainer's choice
    (``model.enable_activation_checkpointing``)."""
    layout = Layout.from_config(cfg.layout, cfg.model.vocab_size)
    # the NBP authors' released architecture (nbp_ds.model.gpt2) or the project's own
    model_class = GPT2Model if cfg.model.arch == "gpt2" else NBPModel
    if device is None:
        model = model_class(cfg.model, layout)
    else:
        with torch.device(device):
            model = model_class(cfg.model, layout)
    model.compile_layers(compile_enabled(cfg.model.compile, device))
    return model
