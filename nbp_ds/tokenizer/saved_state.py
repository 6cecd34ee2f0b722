"""The tokenizer trainer's stateful parts as its checkpoints keep them, each with ``save(ref)`` / ``load(ref)``
(nbp_ds.runtime.checkpoint.CheckpointPart), registered once with the trainer's
:class:`~nbp_ds.runtime.checkpoint.CheckpointManager` so that a save and a resume walk the same list:

    weights        the tokenizer's weights, its optimizer, the step and the run config (``state.pt``)
    discriminator  the PatchGAN and its optimizer (``discriminator.pt``) and each rank's LeCAM averages
    ema            the moving average of the weights (nbp_ds.runtime.ema.EmaState)
    clip_stream    this rank's position in the training clip stream, its record in the checkpoint
    rng            every rank's random streams (registered by the manager itself, always last)

DDP keeps the weights and optimizers equal on every rank, so rank 0 writes them once and every rank reads them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from nbp_ds.errors import CheckpointError
from nbp_ds.files import atomic_output, write_text_atomic
from nbp_ds.runtime.checkpoint import CheckpointManager, CheckpointRef, Stateful, save_rank_state
from nbp_ds.tokenizer.clip_stream import ClipLoader
from nbp_ds.tokenizer.training import LeCam

log = logging.getLogger(__name__)


class SharedState:
    """A state every rank holds alike (``state``: model, optimizer, step), kept as one file ``name`` that rank 0
    writes and every rank reads. ``required``: a checkpoint without the file is refused, else the state is left
    as it is (a part turned on after the checkpoint was saved)."""

    def __init__(self, name: str, state: Stateful, rank: int, required: bool = True):
        self.name, self.state, self.rank, self.required = name, state, rank, required

    def save(self, ref: CheckpointRef) -> None:
        if self.rank == 0:
            with atomic_output(ref.path / self.name) as tmp:
                torch.save(self.state.state_dict(), tmp)

    def load(self, ref: CheckpointRef) -> None:
        file = ref.path / self.name
        if not file.is_file():
            if self.required:
                raise CheckpointError(f"{file} is missing: this checkpoint was not saved by this tokenizer trainer")
            log.warning("%s holds no %s: it starts afresh", ref.path, Path(self.name).stem)
            return
        self.state.load_state_dict(torch.load(file, map_location="cpu", weights_only=False))


class ModelAndOptimizer:
    """A module and its optimizer as one state."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class Discriminator:
    """The PatchGAN with its optimizer (rank 0's file) and this rank's LeCAM averages of its logits (a small
    file per rank: each rank's averages follow its own batches)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, lecam: LeCam, rank: int):
        self.weights = SharedState("discriminator.pt", ModelAndOptimizer(model, optimizer), rank, required=False)
        self.lecam, self.rank = lecam, rank

    def _lecam_file(self, ref: CheckpointRef) -> Path:
        return ref.path / f"rank{self.rank:05d}_lecam.json"

    def save(self, ref: CheckpointRef) -> None:
        self.weights.save(ref)
        write_text_atomic(self._lecam_file(ref), json.dumps(self.lecam.state_dict()))

    def load(self, ref: CheckpointRef) -> None:
        self.weights.load(ref)
        if (file := self._lecam_file(ref)).is_file():  # absent: saved without the GAN, or by fewer ranks
            self.lecam.load_state_dict(json.loads(file.read_text()))


class ClipStreamPosition:
    """Where this rank's training clip stream is, as the rank's record in the checkpoint; loading it (before the
    first batch) continues the stream there."""

    def __init__(self, stream: ClipLoader, rank: int):
        self.stream, self.rank = stream, rank

    def save(self, ref: CheckpointRef) -> None:
        save_rank_state(ref, self.rank, self.stream.state_dict())

    def load(self, ref: CheckpointRef) -> None:
        state = CheckpointManager.rank_state(ref, self.rank)
        if state is None:  # a rank the checkpoint did not have: the furthest epoch any saved rank reached
            records = CheckpointManager.rank_states(ref)
            if not records:
                raise CheckpointError(f"{ref.path} holds no clip stream position (rankNNNNN_data.json)")
            state = {**records[0], "positions": [p for r in records for p in r["positions"]]}
        self.stream.load_state_dict(state)
