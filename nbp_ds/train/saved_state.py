"""The trainer's stateful parts as its checkpoints keep them, each with ``save(ref)`` / ``load(ref)`` reading
the files it writes (nbp_ds.runtime.checkpoint.CheckpointPart). The trainer registers them once with its
:class:`~nbp_ds.runtime.checkpoint.CheckpointManager`, and a save and a resume walk the same registry:

    engine       model, optimizer and LR schedule (DeepSpeed's files), with the train state and the run
                 config as DeepSpeed's client state (rank 0's model-states file, which export and resume read
                 without DeepSpeed)
    ema          the moving average of the weights (train.ema), one file per rank (nbp_ds.runtime.ema.EmaState)
    data         the training loader's position, a small record per rank
    rng          every rank's random streams (registered by the manager itself, always last)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from nbp_ds.data import TokenLoader
from nbp_ds.data.loader import restore
from nbp_ds.runtime.checkpoint import CheckpointManager, CheckpointRef, Stateful, save_rank_state
from nbp_ds.train.deferred_writes import defer_write_errors

log = logging.getLogger(__name__)


class EngineState:
    """DeepSpeed's engine (model, optimizer, LR schedule) and the ``client`` parts that travel in its client
    state. ``source`` gives the checkpoint to read for ``ref`` (its universal copy when the world size
    changed), and ``after_load`` runs after the engine's load (the trainer sets the run config's optimizer
    hyper-parameters there: a universal copy does not keep each group's, and train.allow_changes may change them).
    A file DeepSpeed fails to write raises only once its save is over on every rank
    (nbp_ds.train.deferred_writes); ``before_write(path)`` runs before each of its files is written."""

    def __init__(self, engine, client: dict[str, Stateful], config: dict[str, Any],
                 source: Callable[[CheckpointRef], CheckpointRef] = lambda ref: ref,
                 after_load: Callable[[], None] = lambda: None,
                 before_write: Callable[[str], None] | None = None):
        self.engine, self.client, self.config = engine, client, config
        self.source, self.after_load = source, after_load
        self.writes = defer_write_errors(engine, before_write)

    def save(self, ref: CheckpointRef) -> None:
        client = {name: part.state_dict() for name, part in self.client.items()}
        client["config"] = self.config
        self.engine.save_checkpoint(str(ref.folder), tag=ref.tag, client_state=client, save_latest=False)
        self.writes.raise_deferred()  # now that DeepSpeed's own barriers are behind every rank

    def load(self, ref: CheckpointRef) -> None:
        source = self.source(ref)
        _, client = self.engine.load_checkpoint(str(source.folder), tag=source.tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if client is None:
            raise FileNotFoundError(f"checkpoint {source.path} could not be loaded")
        self.after_load()
        for name, part in self.client.items():
            part.load_state_dict(client.get(name, {}))  # a part newer than the checkpoint starts from its defaults


class LoaderPosition:
    """Where this rank's training stream is: its loader's state as the rank's record in the checkpoint.
    Loading continues the stream there (nbp_ds.data.loader.restore), through every rank's records when the
    number of ranks or workers changed; ``replay_batches`` says how far a checkpoint from before loaders had a
    state read the stream (None: not on this layout)."""

    def __init__(self, loader: TokenLoader, rank: int, replay_batches: Callable[[], int | None]):
        self.loader, self.rank, self.replay_batches = loader, rank, replay_batches

    def save(self, ref: CheckpointRef) -> None:
        save_rank_state(ref, self.rank, self.loader.state_dict())

    def load(self, ref: CheckpointRef) -> None:
        how = restore(self.loader, CheckpointManager.rank_state(ref, self.rank),
                      lambda: CheckpointManager.rank_states(ref), replay_batches=self.replay_batches())
        if self.rank == 0:
            log.info("data stream %s", how)
