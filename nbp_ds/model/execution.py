"""How the transformer layers run over a whole sequence: activation checkpointing and regional compilation.

* Activation checkpointing (``train.activation_checkpointing``): ``none`` keeps every activation backward
  needs; ``full`` keeps only each layer's input and recomputes the layer in backward; ``selective`` keeps the
  outputs of the matmuls and the attention kernel and recomputes the cheap elementwise work in between
  (norms, rotary embedding, SwiGLU's activation, residual adds, casts). The policy goes through torch's
  ``create_selective_checkpoint_contexts``, which works eagerly and inside a compiled layer.
* Regional compilation (``model.compile``): each layer's sequence pass is one ``torch.compile``d function
  with ``fullgraph=True`` (a graph break is an error, not a silent slowdown). The layers share the code and
  differ only in their weights, which compiled code takes as inputs, so one graph serves all of them: no
  recompilation from the second layer on. The checkpoint sits inside the compiled function, so the compiler
  sees the policy and plans the recomputation itself; module hooks (DeepSpeed ZeRO-3 gathers a layer's
  parameters in them) stay outside, on the layer's own call.

Decoding with a KV cache never goes through here: it runs each layer eagerly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

LayerFn = Callable[..., torch.Tensor]  # (layer, x, *positions) -> x; positions: the rotary tables, or none


def _ops(*names: str) -> frozenset:
    """The aten / higher-order operators of these names that this torch build has."""
    found = set()
    for name in names:
        namespace, _, op = name.rpartition(".")
        packet = getattr(getattr(torch.ops, namespace), op, None)
        if packet is not None:
            found.add(packet.default if hasattr(packet, "default") else packet)
    return frozenset(found)


# what selective checkpointing keeps: matmul and attention outputs (recomputing them costs FLOPs)
SAVED_BY_SELECTIVE = _ops(
    "aten.mm", "aten.addmm", "aten.bmm", "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_efficient_attention", "aten._scaled_dot_product_cudnn_attention",
    "aten._scaled_dot_product_flash_attention_for_cpu", "aten._flash_attention_forward",
    "aten._efficient_attention_forward", "higher_order.flex_attention",
)


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_BY_SELECTIVE else CheckpointPolicy.PREFER_RECOMPUTE


def run_layer(layer, x: torch.Tensor, *positions: torch.Tensor) -> torch.Tensor:
    return layer.block(x, *positions)


def run_layer_recomputed(layer, x: torch.Tensor, *positions: torch.Tensor) -> torch.Tensor:
    return checkpoint(layer.block, x, *positions, use_reentrant=False)


def run_layer_selective(layer, x: torch.Tensor, *positions: torch.Tensor) -> torch.Tensor:
    return checkpoint(layer.block, x, *positions, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, _keep_matmuls))


# the activation checkpointing modes (the run config's train.activation_checkpointing, validated there, names them)
RUNNERS: dict[str, LayerFn] = {"none": run_layer, "full": run_layer_recomputed, "selective": run_layer_selective}

_compiled: dict[LayerFn, LayerFn] = {}


def compiled(fn: LayerFn) -> LayerFn:
    """``fn`` compiled whole (fullgraph: a graph break raises), made once per process and shared by every layer."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _compiled[fn]


@dataclass(frozen=True)
class LayerExecution:
    """What a layer runs for a whole sequence: ``training`` when it builds a graph for backward (training mode,
    grad enabled), ``inference`` otherwise."""

    checkpointing: str = "none"
    compiled: bool = False

    @property
    def training(self) -> LayerFn:
        fn = RUNNERS[self.checkpointing]
        return compiled(fn) if self.compiled else fn

    @property
    def inference(self) -> LayerFn:
        return compiled(run_layer) if self.compiled else run_layer

    @classmethod
    def from_settings(cls, checkpointing: bool | str = "none", compile: bool | str = False,
                      device: torch.device | str | None = None) -> LayerExecution:
        """From the settings' words: a checkpointing mode of :data:`RUNNERS` (true and false, as older configs
        say, mean full and none) and a compile setting (auto: compile on a CUDA device, not on the CPU, where
        compiling costs more time than it saves in tests)."""
        if isinstance(checkpointing, bool):
            checkpointing = "full" if checkpointing else "none"
        if checkpointing not in RUNNERS:
            raise ValueError(f"activation checkpointing must be one of {', '.join(RUNNERS)} (or true / false), "
                             f"got {checkpointing!r}")
        return cls(checkpointing, compile_enabled(compile, device))


def compile_enabled(setting: bool | str, device: torch.device | str | None = None) -> bool:
    """``model.compile`` for a model on ``device`` (default: torch's default device)."""
    if setting == "auto":
        dev = torch.device(device) if device is not None else torch.get_default_device()
        return dev.type == "cuda"
    return bool(setting)
