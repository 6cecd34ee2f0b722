"""One rank of the trainer (``tiny`` config and overrides), reading back from the optimizer that applies the
updates the learning rate of every parameter group: at each step's first micro-batch (before any of the
step's updates, so the rate that step applies) and after the last step. Rank 0 writes them to a JSON file.

    python -m torch.distributed.run --nproc_per_node 2 tests/readback.py OUT.json key=value ...
"""

from __future__ import annotations

import json
import sys

import torch

from nbp_ds.config import load_config
from nbp_ds.runtime.hooks import TrainerHooks
from nbp_ds.train.loop import Trainer


def applied_lrs(trainer: Trainer) -> list[float]:
    """The rates in the parameter groups of the optimizer under DeepSpeed's ZeRO wrapper (the one whose
    step() changes the weights), one per group."""
    wrapper = trainer.engine.optimizer
    return [group["lr"] for group in getattr(wrapper, "optimizer", wrapper).param_groups]


class ReadBack(TrainerHooks):
    def __init__(self):
        self.trainer: Trainer | None = None
        self.applied: dict[int, list[float]] = {}

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        self.applied.setdefault(step, applied_lrs(self.trainer))
        return loss


def main(out: str, overrides: list[str]) -> int:
    hooks = ReadBack()
    trainer = Trainer(load_config("tiny", overrides), hooks=hooks)
    hooks.trainer = trainer
    status = trainer.run()
    if trainer.rank == 0:
        with open(out, "w") as f:
            json.dump({"applied": hooks.applied, "after_last": applied_lrs(trainer)}, f)
    trainer.close()
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
