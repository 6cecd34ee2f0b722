"""The model's own training step on one device, as the DeepSpeed trainer runs it, for benchmarks.

Precision, as ``--dtype`` names it:

* ``bf16``: what the trainer's ``train.precision=bf16`` runs (DeepSpeed's bf16 mode): bf16 weights, activations
  and gradients in the model; fp32 master weights and AdamW states in the optimizer, which takes the bf16
  gradients into fp32, clips, steps, and writes the weights back in bf16.
* ``autocast``: fp32 weights under ``torch.autocast(bf16)`` (every matmul casts its weight each step).
* ``fp32``: fp32 everywhere (the CPU default).

Every precision clips gradients to the run config's ``train.grad_clip`` like the trainer, without a host
synchronisation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from nbp_ds.config import RunConfig
from nbp_ds.model import NBPModel, build_model

PRECISIONS = ("fp32", "bf16", "autocast")


class MasterWeightAdamW:
    """AdamW over fp32 master copies of a model's bf16 parameters (DeepSpeed's bf16 optimizer, on one device)."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, weight_decay: float, grad_clip: float,
                 fused: bool):
        self.params = params
        self.masters = [p.detach().float().clone().requires_grad_() for p in params]
        for m in self.masters:
            m.grad = torch.zeros_like(m)
        self.grad_clip = grad_clip
        self.inner = torch.optim.AdamW(self.masters, lr=lr, weight_decay=weight_decay, fused=fused)

    def step(self) -> None:
        with torch.profiler.record_function("Optimizer.step#MasterWeightAdamW.step"):
            torch._foreach_copy_([m.grad for m in self.masters], [p.grad for p in self.params])
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.masters, self.grad_clip, foreach=True)
            self.inner.step()
            torch._foreach_copy_([p.data for p in self.params], [m.data for m in self.masters])

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


class PlainAdamW:
    """AdamW on the model's own parameters (fp32 and autocast), with the trainer's clipping."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, weight_decay: float, grad_clip: float,
                 fused: bool):
        self.params, self.grad_clip = params, grad_clip
        self.inner = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)

    def step(self) -> None:
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.inner.step()

    def zero_grad(self) -> None:
        self.inner.zero_grad(set_to_none=True)


def random_batch(cfg: RunConfig, batch_size: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Uniform random tokens (and labels) of the config's grid on ``device``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch_size, *cfg.layout.grid), generator=g)
    label = torch.randint(0, max(1, cfg.layout.num_classes), (batch_size,), generator=g)
    return {"tokens": tokens.to(device), "label": label.to(device)}


def build_training(cfg: RunConfig, device: torch.device, precision: str) -> tuple[NBPModel, object, Callable]:
    """(model, optimizer, autocast context factory) for one device: the model built on ``device`` with the run
    config's ``model.compile`` and ``train.activation_checkpointing``, in ``precision``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, device=device)
    model.enable_activation_checkpointing(cfg.train.activation_checkpointing)
    model.train()
    params = list(model.parameters())
    fused = device.type == "cuda"
    tr = cfg.train
    if precision == "bf16":
        for p in params:  # parameters only: buffers (rotary tables) stay fp32, as DeepSpeed keeps them
            p.data = p.data.to(torch.bfloat16)
        optimizer = MasterWeightAdamW(params, tr.lr, tr.weight_decay, tr.grad_clip, fused)
    else:
        optimizer = PlainAdamW(params, tr.lr, tr.weight_decay, tr.grad_clip, fused)

    def autocast():
        if precision == "autocast":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    return model, optimizer, autocast


def make_step(model: NBPModel, optimizer, autocast: Callable, batch: dict) -> Callable[[], None]:
    """One optimizer step of the model's own loss on ``batch``: forward, backward, clip, update."""

    def step() -> None:
        with autocast():
            loss, _ = model.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step
