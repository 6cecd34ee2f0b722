"""The one seam through which a caller acts inside the training loop.

The trainer calls these methods at fixed points; the base class does nothing. A subclass is named in
the run config, ``train.hooks=package.module:MyHooks`` (imported and made with no arguments in every
rank), or passed as ``Trainer(cfg, hooks=MyHooks())`` (several through :class:`HookChain`): a user's
profiler or custom logging, the sample videos in TensorBoard (nbp_ds.sample_log, which ``nbp-train``
adds), and the test suite's fault injection (``tests/faults.py``: a poisoned loss, slowed steps, a rank
that stalls in the middle of a checkpoint, a full disk). Production code never reads test switches itself.
The seam sits in the runtime so that a hook's module (nbp_ds.sample_log, a user's) imports no trainer;
``nbp_ds.train.hooks`` is its first path, the same classes.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch

from nbp_ds.errors import ConfigError


class TrainerHooks:
    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss of a micro-batch of step ``step`` (1-based), before backward; return what to use."""
        return loss

    def on_step_end(self, step: int) -> None:
        """Step ``step`` has been applied (or skipped) and counted."""

    def on_checkpoint_file(self, path: str, rank: int) -> None:
        """DeepSpeed is about to write ``path``, a file of this rank's part of a checkpoint (an ``OSError``
        raised here fails the save as a full disk would)."""

    def on_checkpoint_written(self, tag: str, rank: int) -> None:
        """This rank has written its part of checkpoint ``tag``; ``latest`` has not moved yet."""

    def on_samples_due(self, trainer: Any, step: int) -> None:
        """``train.sample_every`` says samples are due after step ``step``; ``trainer`` is the
        nbp_ds.train.loop.Trainer. Every rank is called (generating under ZeRO-3 gathers the weights)."""


class HookChain(TrainerHooks):
    """Several hooks as one, called in the order given; each ``on_loss`` gets the loss the one before returned."""

    def __init__(self, hooks: Sequence[TrainerHooks]):
        self.hooks = list(hooks)

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        for hooks in self.hooks:
            loss = hooks.on_loss(step, loss)
        return loss

    def on_step_end(self, step: int) -> None:
        for hooks in self.hooks:
            hooks.on_step_end(step)

    def on_checkpoint_file(self, path: str, rank: int) -> None:
        for hooks in self.hooks:
            hooks.on_checkpoint_file(path, rank)

    def on_checkpoint_written(self, tag: str, rank: int) -> None:
        for hooks in self.hooks:
            hooks.on_checkpoint_written(tag, rank)

    def on_samples_due(self, trainer: Any, step: int) -> None:
        for hooks in self.hooks:
            hooks.on_samples_due(trainer, step)


def load_hooks(spec: str | None) -> TrainerHooks:
    """The hooks ``train.hooks`` names ("module:Class"), or the do-nothing base."""
    if not spec:
        return TrainerHooks()
    module_name, _, class_name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"train.hooks={spec!r}: cannot import it as module:Class ({exc})") from exc
    if not (isinstance(cls, type) and issubclass(cls, TrainerHooks)):
        raise ConfigError(f"train.hooks={spec!r} is not a subclass of nbp_ds.runtime.hooks.TrainerHooks")
    return cls()
