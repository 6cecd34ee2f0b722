"""The trainer's own state, saved in every checkpoint next to DeepSpeed's model and optimizer states."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainState:
    """Where a run is. ``batches`` counts the micro-batches drawn from the training stream, which is where
    a resumed stream continues; ``world_size`` records how many processes drew them."""

    step: int = 0  # optimizer steps done
    batches: int = 0  # micro-batches drawn from the training stream (per rank)
    bad_steps: int = 0  # steps whose update was skipped (non-finite loss or gradient)
    world_size: int = 1  # data-parallel processes that produced this state

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(state) - names)
        if unknown:
            raise KeyError(f"train state has unknown keys {unknown}; known: {sorted(names)}")
        for key, value in state.items():
            setattr(self, key, value)
