"""An exponential moving average (EMA) of the model's weights: ``train.ema`` = its decay d.

After every optimizer step ``ema = d * ema + (1 - d) * weights``; the first step copies the weights (so the
average never includes the random initialization). Kept in fp32, on the device of the weights it follows:

* under ZeRO-3 each rank averages only its partition of every parameter (``param.ds_tensor``, a flat
  slice of the padded parameter), so the average costs 4 bytes per parameter spread over the ranks;
* otherwise every rank holds the full parameters, and rank 0 alone keeps the average.

Each rank saves what it holds in the checkpoint's tag folder (``ema_rank00000.pt``, ...); :func:`consolidate`
joins the partitions into a full state dict (``nbp-export --ema``), which samples like the raw weights. A run
resumed on another number of processes (or ZeRO stage) joins them and takes its own part. :class:`EmaState` is the
checkpoint part both trainers register for it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from nbp_ds.errors import CheckpointError
from nbp_ds.files import atomic_output
from nbp_ds.runtime.checkpoint import CheckpointRef

log = logging.getLogger(__name__)


def _local_view(param: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this rank holds: its ZeRO-3 partition, else the parameter itself."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param


class WeightsEMA:
    def __init__(self, model: torch.nn.Module, decay: float, rank: int, world: int = 1):
        self.decay, self.rank, self.world = decay, rank, world
        named = list(model.named_parameters())
        self.partitioned = any(hasattr(p, "ds_tensor") for _, p in named)
        self.active = self.partitioned or rank == 0
        self.params = named if self.active else []
        self.average: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights into the average (call after each optimizer step)."""
        if not self.active:
            return
        if not self.average:
            self.average = {n: _local_view(p).detach().float().clone() for n, p in self.params}
            return
        current = [_local_view(p).detach().float() for _, p in self.params]
        torch._foreach_lerp_(list(self.average.values()), current, 1.0 - self.decay)

    def state_dict(self) -> dict:
        meta = {n: {"shape": list(getattr(p, "ds_shape", p.shape)), "numel": int(getattr(p, "ds_numel", p.numel()))}
                for n, p in self.params}
        return {"decay": self.decay, "partitioned": self.partitioned, "rank": self.rank, "meta": meta,
                "average": {n: t.cpu() for n, t in self.average.items()}}

    def load_state_dict(self, state: dict) -> None:
        device = {n: _local_view(p).device for n, p in self.params}
        self.average = {n: t.to(device[n]) for n, t in state["average"].items()}

    # ---- files --------------------------------------------------------------------------------------
    def save(self, tag_folder: Path) -> None:
        if self.active:
            with atomic_output(Path(tag_folder) / f"ema_rank{self.rank:05d}.pt") as tmp:
                torch.save(self.state_dict(), tmp)

    def load(self, tag_folder: Path) -> bool:
        """This rank's average from a checkpoint; False when it has none (saved without train.ema)."""
        tag_folder = Path(tag_folder)
        if not self.active or not any(tag_folder.glob("ema_rank*.pt")):
            return False
        mine = tag_folder / f"ema_rank{self.rank:05d}.pt"
        if mine.is_file():
            state = torch.load(mine, map_location="cpu", weights_only=True)
            if state["partitioned"] == self.partitioned and all(
                    state["average"][n].shape == _local_view(p).shape for n, p in self.params):
                self.load_state_dict(state)
                return True
        full = consolidate(tag_folder)  # saved by another number of processes or another ZeRO stage
        self.average = {n: self._local_part(p, full[n]) for n, p in self.params}
        return True

    def _local_part(self, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full averaged parameter, laid out as the parameter it follows."""
        local = _local_view(param)
        if not self.partitioned:
            return full.reshape(local.shape).float().to(local.device)
        size = local.numel()  # ZeRO-3: equal flat slices of the parameter padded to size x world
        flat = torch.zeros(size * self.world, dtype=torch.float32)
        flat[: full.numel()] = full.reshape(-1).float()
        return flat[self.rank * size:(self.rank + 1) * size].reshape(local.shape).to(local.device)


class EmaState:
    """The moving average of the weights; a checkpoint saved without one leaves it at the current weights."""

    def __init__(self, ema: WeightsEMA):
        self.ema = ema

    def save(self, ref: CheckpointRef) -> None:
        self.ema.save(ref.path)

    def load(self, ref: CheckpointRef) -> None:
        if not self.ema.load(ref.path):
            log.warning("%s holds no moving average of the weights: train.ema starts from the current weights",
                        ref.path)


def consolidate(tag_folder: Path) -> dict[str, torch.Tensor]:
    """The full averaged weights of a checkpoint: every rank's partitions joined, or rank 0's full copy."""
    files = sorted(Path(tag_folder).glob("ema_rank*.pt"))
    if not files:
        raise CheckpointError(f"{tag_folder}: no moving average of the weights here (train with train.ema > 0)")
    states = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    if not states[0]["partitioned"]:
        return states[0]["average"]
    states.sort(key=lambda s: s["rank"])
    full = {}
    for name, meta in states[0]["meta"].items():
        flat = torch.cat([s["average"][name].reshape(-1) for s in states])
        full[name] = flat[: meta["numel"]].reshape(meta["shape"]).clone()
    return full
