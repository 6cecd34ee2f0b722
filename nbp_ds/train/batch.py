"""The global batch: samples per optimizer step over all processes, ``micro_batch x grad_accum x processes``.

With ``train.global_batch`` set, it is what stays fixed: gradient accumulation is derived from the number of
processes and the micro-batch, so a run moved from 4 to 8 nodes, or resumed on another number of GPUs, keeps its
batch (and so what its LR means). A global batch the micro-batch and processes cannot make is refused with the
nearest sizes that work. Without it, the global batch is whatever the three give.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from nbp_ds.config import TrainConfig
from nbp_ds.errors import ConfigError


@dataclass(frozen=True)
class GlobalBatch:
    """The batch as it runs on ``processes`` data-parallel processes, worked out once by :func:`plan_batch` before
    anything (the DeepSpeed config, the trainer's throughput figures) reads it."""

    micro_batch: int
    grad_accum: int
    processes: int

    @property
    def samples(self) -> int:
        """Samples per optimizer step over all processes."""
        return self.micro_batch * self.grad_accum * self.processes

    def applied_to(self, tr: TrainConfig) -> TrainConfig:
        """``tr`` with its ``grad_accum`` and ``global_batch`` as they run here."""
        return dataclasses.replace(tr, grad_accum=self.grad_accum, global_batch=self.samples)


def plan_batch(tr: TrainConfig, world: int, pack_tokens: int = 0) -> GlobalBatch:
    """The batch ``tr`` asks for on ``world`` data-parallel processes: with ``train.global_batch`` set, the
    accumulation that makes it (refused, with the nearest sizes that work, when none does). A packed run
    (``pack_tokens`` = data.pack_tokens > 0) may give it in positions, ``train.global_batch_tokens``: so many rows."""
    if tr.global_batch_tokens is not None:
        if not pack_tokens or tr.global_batch_tokens % pack_tokens:
            raise ConfigError(f"train.global_batch_tokens={tr.global_batch_tokens} must be a multiple of "
                              f"data.pack_tokens={pack_tokens} (and packing on)")
        tr = dataclasses.replace(tr, global_batch=tr.global_batch_tokens // pack_tokens)
    if tr.global_batch is None:
        return GlobalBatch(tr.micro_batch, tr.grad_accum, world)
    per_pass = tr.micro_batch * world
    accum, rest = divmod(tr.global_batch, per_pass)
    if rest or accum == 0:
        lower, upper = max(accum, 1) * per_pass, (accum + 1) * per_pass
        sizes = f"{lower}" if lower >= tr.global_batch else f"{lower} or {upper}"
        micro = [m for m in range(tr.micro_batch, 0, -1) if tr.global_batch % (m * world) == 0]
        micro_hint = f", or train.micro_batch={micro[0]} (accumulating {tr.global_batch // (micro[0] * world)})" \
            if micro else ""
        raise ConfigError(f"train.global_batch={tr.global_batch} is not a multiple of train.micro_batch x processes "
                          f"= {tr.micro_batch} x {world} = {per_pass}: nearest global batches that work: {sizes}"
                          f"{micro_hint}")
    if tr.grad_accum not in (1, accum):
        raise ConfigError(f"train.grad_accum={tr.grad_accum} contradicts train.global_batch={tr.global_batch} "
                          f"(= {tr.micro_batch} x {accum} x {world} processes): leave train.grad_accum out, it is "
                          f"derived")
    return GlobalBatch(tr.micro_batch, accum, world)


def resolve_global_batch(tr: TrainConfig, world: int) -> TrainConfig:
    """A copy of ``tr`` with ``grad_accum`` and ``global_batch`` fixed for ``world`` data-parallel processes."""
    return plan_batch(tr, world).applied_to(tr)


def recorded_global_batch(recorded: dict[str, Any], world: int | None) -> dict[str, Any]:
    """A recorded run config (a checkpoint's) with ``train.global_batch`` filled in when it was saved before the key
    existed: its micro-batch x accumulation x the ``world`` processes that saved it (unchanged when unknown)."""
    train = recorded.get("train", {})
    if train.get("global_batch") is not None or world is None or "micro_batch" not in train:
        return recorded
    return {**recorded, "train": {**train, "global_batch": train["micro_batch"] * train.get("grad_accum", 1) * world}}


def describe(tr: TrainConfig, world: int) -> str:
    """The effective batch in words, for the log."""
    return (f"global batch {tr.global_batch} samples = micro-batch {tr.micro_batch} x {tr.grad_accum} accumulation "
            f"step{'s' * (tr.grad_accum != 1)} x {world} process{'es' * (world != 1)}")
