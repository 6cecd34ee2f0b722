"""Building the model its own settings describe (``model`` and ``layout``, no training or data settings): the one
place that chooses the architecture."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from nbp_ds.config import LayoutConfig, ModelConfig
from nbp_ds.layout import Layout
from nbp_ds.model.execution import compile_enabled
from nbp_ds.model.gpt2 import GPT2Model
from nbp_ds.model.transformer import NBPModel


@dataclass(frozen=True)
class ModelSpec:
    """What a model is: its architecture and sizes (``model``) and the sequence it reads (``layout``)."""

    model: ModelConfig
    layout: LayoutConfig


class HasModelSpec(Protocol):
    """A run config, a :class:`ModelSpec` or anything else holding the two."""

    model: ModelConfig
    layout: LayoutConfig


def build(spec: ModelSpec, device: torch.device | str | None = None) -> NBPModel:
    """Build the model ``spec`` describes (``model.arch``: the project's LLaMA-style NBPModel, or the NBP authors'
    GPT-2-style one), with its weights made and initialized directly on ``device`` (default: torch's default
    device; never a full-size copy on the CPU first). Under ``deepspeed.zero.Init`` (ZeRO-3) every constructor's
    parameters are partitioned as they are made. ``model.compile`` decides whether the layers are compiled (auto:
    on a CUDA device); activation checkpointing is the trainer's choice (``model.enable_activation_checkpointing``)."""
    layout = Layout.from_config(spec.layout, spec.model.vocab_size)
    # the NBP authors' released architecture (nbp_ds.model.gpt2) or the project's own
    model_class = GPT2Model if spec.model.arch == "gpt2" else NBPModel
    if device is None:
        model = model_class(spec.model, layout)
    else:
        with torch.device(device):
            model = model_class(spec.model, layout)
    model.compile_layers(compile_enabled(spec.model.compile, device))
    return model


def build_model(cfg: HasModelSpec, device: torch.device | str | None = None) -> NBPModel:
    """The stable entry: the model of a run config (its ``model`` and ``layout``; the rest is not read), built as
    :func:`build` builds it."""
    return build(ModelSpec(cfg.model, cfg.layout), device)
