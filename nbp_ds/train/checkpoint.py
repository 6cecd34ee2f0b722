"""Checkpoints that survive preemption: a tag folder per save (DeepSpeed's sharded model and
optimizer states plus our client state), and a ``latest`` file that moves only after every rank has
finished writing, atomically (write to a temporary file, fsync, rename). Older tags beyond
``train.keep_last`` are deleted only after ``latest`` has moved past them."""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from nbp_ds.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

LATEST = "latest"
TAG_PREFIX = "step"
# the keys whose change makes a checkpoint unusable for this run
SHAPE_KEYS = {"layout": ("grid", "block", "hybrid", "condition", "num_classes", "context_frames"),
              "model": ("n_layer", "d_model", "n_head", "vocab_size", "ffn_dim")}


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_latest(ckpt_dir: Path) -> str | None:
    """The tag of the last complete checkpoint in a folder, or None."""
    latest = ckpt_dir / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"{latest} names checkpoint {tag!r}, which does not exist in {ckpt_dir}")
    return tag


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_compatible(saved: dict, cfg: RunConfig, where: str) -> None:
    """Refuse a checkpoint whose model or layout differs from the run's, naming the keys."""
    current = cfg.to_dict()
    diffs = [f"{section}.{key}: checkpoint {saved.get(section, {}).get(key)!r}, run {current[section][key]!r}"
             for section, keys in SHAPE_KEYS.items() for key in keys
             if saved.get(section, {}).get(key) != current[section][key]]
    if diffs:
        raise ConfigError(f"checkpoint {where} was trained with a different model shape: " + "; ".join(diffs))


class CheckpointManager:
    def __init__(self, ckpt_dir: Path, keep_last: int, rank: int):
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.rank = rank

    def save(self, engine, step: int, client_state: dict[str, Any]) -> str:
        """Save on every rank; move ``latest`` once all have finished; prune old tags."""
        tag = tag_for(step)
        began = time.time()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        # per-rank state that DeepSpeed's client_state (saved by rank 0 only) would lose
        torch.save({"rng": rng_state()}, self.dir / tag / f"rank{self.rank:05d}_rng.pt")
        if os.environ.get("NBP_TEST_DIE_BEFORE_LATEST"):  # test hook: a save killed before it completes
            log.warning("NBP_TEST_DIE_BEFORE_LATEST: stopping after the shards, before 'latest' moves")
            time.sleep(3600)
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:
            write_atomic(self.dir / LATEST, tag)
            self._prune()
            log.info("saved checkpoint %s in %.1f s", self.dir / tag, time.time() - began)
        if dist.is_initialized():
            dist.barrier()
        return tag

    def _prune(self) -> None:
        tags = sorted(p.name for p in self.dir.glob(f"{TAG_PREFIX}*") if p.is_dir())
        latest = read_latest(self.dir)
        for old in tags[: max(len(tags) - self.keep_last, 0)]:
            if old != latest:
                shutil.rmtree(self.dir / old, ignore_errors=True)

    def load(self, engine, tag: str, cfg: RunConfig) -> dict[str, Any]:
        """Restore engine (model, optimizer, LR schedule) and this rank's RNG; return client state."""
        _, client = engine.load_checkpoint(str(self.dir), tag=tag, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
        if client is None:
            raise FileNotFoundError(f"checkpoint {self.dir / tag} could not be loaded")
        rng_file = self.dir / tag / f"rank{self.rank:05d}_rng.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False)["rng"])
        else:
            log.warning("%s missing (different world size?): RNG streams restart", rng_file.name)
        return client


def peek_client_config(ckpt_dir: Path, tag: str) -> dict | None:
    """The run config stored with a checkpoint (rank 0's model-states file), without DeepSpeed."""
    files = sorted((ckpt_dir / tag).glob("*mp_rank_00_model_states.pt"))
    if not files:
        return None
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    return state.get("config")
