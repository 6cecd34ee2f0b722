"""Checkpoints that survive preemption, for every trainer in nbp_ds.

A checkpoints folder holds one tag folder per save (``step00001000``) and a ``latest`` file naming the
last complete one. :class:`CheckpointManager` runs a save in the order that keeps ``latest`` true:
every rank writes its part of the tag folder (the caller's writer: DeepSpeed's sharded states, or a
state dict), its own RNG state and its own small state record (the data loader's position,
``rankNNNNN_data.json``), then all ranks meet at a barrier, and only then does rank 0 move ``latest``
(atomically) and delete tags beyond ``keep_last``, never the one ``latest`` names. A process killed at
any point leaves ``latest`` naming a complete checkpoint.

:func:`find_checkpoint` is the one way to go from what a user names (a run folder, its checkpoints
folder, a tag folder) to a checkpoint: resuming, exporting and sampling all use it.

**Another number of processes.** A ZeRO checkpoint's optimizer state is partitioned for the world size
that saved it. :func:`universal_checkpoint` converts a tag folder once into DeepSpeed's *universal*
format (``ds_to_universal``: every parameter's fp32 weights and Adam moments whole, in
``<tag>/universal/zero/<name>/``), which an engine of any world size loads with
``"checkpoint": {"load_universal": true}`` in its DeepSpeed config (:func:`with_universal_load`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nbp_ds.errors import UsageError
from nbp_ds.files import atomic_output, write_text_atomic
from nbp_ds.train import distributed

log = logging.getLogger(__name__)

LATEST = "latest"
TAG_PREFIX = "step"


class CheckpointError(UsageError, ValueError):
    """A path that does not hold the checkpoint or weights file it should (missing, dangling, another model's,
    or unreadable without more trust); the message names it and what is wrong."""


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint: the checkpoints folder that holds it, and its tag (the sub-folder's name)."""

    folder: Path
    tag: str

    @property
    def path(self) -> Path:
        return self.folder / self.tag

    @property
    def step(self) -> int | None:
        digits = self.tag[len(TAG_PREFIX):]
        return int(digits) if self.tag.startswith(TAG_PREFIX) and digits.isdigit() else None


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def read_latest(folder: Path) -> str | None:
    """The tag ``folder/latest`` names, or None when there is no ``latest``; a ``latest`` naming a tag
    folder that does not exist is refused (the checkpoint was deleted or the folder copied in part)."""
    latest = Path(folder) / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not (Path(folder) / tag).is_dir():
        raise CheckpointError(f"{latest} names checkpoint {tag!r}, but {Path(folder) / tag} does not exist: restore "
                              f"that folder, or point {latest} at a complete one")
    return tag


def find_checkpoint(path: str | Path, tag: str | None = None) -> CheckpointRef:
    """A training output folder, its checkpoints/ folder, or one tag folder -> the checkpoint it holds
    (the one ``latest`` names unless ``tag`` is given)."""
    path = Path(path)
    for folder in (path, path / "checkpoints"):
        if tag is not None and (folder / tag).is_dir():
            return CheckpointRef(folder, tag)
        if tag is None and (found := read_latest(folder)) is not None:
            return CheckpointRef(folder, found)
    if tag is None and path.is_dir() and _looks_like_tag(path):
        return CheckpointRef(path.parent, path.name)
    wanted = f"tag {tag!r}" if tag else "a 'latest' file, a checkpoints/ folder or a tag folder"
    raise CheckpointError(f"{path}: no checkpoint here (expected {wanted})")


def _looks_like_tag(path: Path) -> bool:
    return any(path.glob("*model_states.pt")) or (path / "state.pt").is_file()


def peek_client_state(ref: CheckpointRef) -> dict | None:
    """What DeepSpeed's rank-0 model-states file holds besides the model (the trainer's client state: run
    config, train state), read without DeepSpeed; None when the checkpoint has no such file."""
    files = sorted(ref.path.glob("*mp_rank_00_model_states.pt"))
    if not files:
        return None
    return torch.load(files[0], map_location="cpu", weights_only=False)


def peek_client_config(ref: CheckpointRef) -> dict | None:
    """The run config stored with a DeepSpeed checkpoint (rank 0's model-states file), without DeepSpeed."""
    state = peek_client_state(ref)
    return None if state is None else state.get("config")


# ---- RNG: every rank keeps its own streams (dropout, class dropout, sampling) ---------------------
def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_file(ref: CheckpointRef, rank: int) -> Path:
    return ref.path / f"rank{rank:05d}_rng.pt"


def _rank_state_file(ref: CheckpointRef, rank: int) -> Path:
    return ref.path / f"rank{rank:05d}_data.json"


Writer = Callable[[Path, str], None]


class CheckpointManager:
    """Saves and finds the checkpoints of one run folder (see the module docstring for the order)."""

    def __init__(self, folder: str | Path, keep_last: int, rank: int):
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.rank = rank

    def latest(self) -> CheckpointRef | None:
        tag = read_latest(self.folder)
        return CheckpointRef(self.folder, tag) if tag else None

    def save(self, step: int, write: Writer, rank_state: dict[str, Any] | None = None) -> CheckpointRef:
        """Every rank calls this: ``write(folder, tag)`` writes this rank's part (and ``rank_state``, a small
        JSON-ready record of this rank's own, is kept next to it), then ``latest`` moves."""
        ref = CheckpointRef(self.folder, tag_for(step))
        began = time.time()
        ref.path.mkdir(parents=True, exist_ok=True)
        write(self.folder, ref.tag)
        with atomic_output(_rng_file(ref, self.rank)) as tmp:
            torch.save(rng_state(), tmp)
        if rank_state is not None:
            write_text_atomic(_rank_state_file(ref, self.rank), json.dumps(rank_state))
        distributed.barrier()  # every rank's part is on disk before 'latest' may name it
        if self.rank == 0:
            write_text_atomic(self.folder / LATEST, ref.tag)
            self._prune()
            log.info("saved checkpoint %s in %.1f s", ref.path, time.time() - began)
        distributed.barrier()  # nobody runs ahead (and, say, saves again) before 'latest' moved
        return ref

    def restore_rng(self, ref: CheckpointRef) -> bool:
        """This rank's RNG streams as they were at ``ref``; False when the checkpoint has none for this rank
        (it was saved by fewer processes)."""
        file = _rng_file(ref, self.rank)
        if not file.is_file():
            return False
        set_rng_state(torch.load(file, weights_only=False))
        return True

    @staticmethod
    def rank_state(ref: CheckpointRef, rank: int) -> dict[str, Any] | None:
        """The record rank ``rank`` kept with checkpoint ``ref`` (None: it kept none)."""
        file = _rank_state_file(ref, rank)
        return json.loads(file.read_text()) if file.is_file() else None

    @staticmethod
    def rank_states(ref: CheckpointRef) -> list[dict[str, Any]]:
        """The records of every rank that kept one, in rank order."""
        return [json.loads(f.read_text()) for f in sorted(ref.path.glob("rank*_data.json"))]

    def _prune(self) -> None:
        tags = sorted(p.name for p in self.folder.glob(f"{TAG_PREFIX}*") if p.is_dir())
        latest = read_latest(self.folder)
        for old in tags[: max(len(tags) - self.keep_last, 0)]:
            if old != latest:
                shutil.rmtree(self.folder / old, ignore_errors=True)


# ---- universal checkpoints: resuming on another number of processes ---------------------------------
UNIVERSAL = "universal"  # the converted copy's folder inside a tag folder (DeepSpeed's tag for loading it)


def saved_world_size(ref: CheckpointRef, client: dict | None = None) -> int | None:
    """How many data-parallel processes wrote ``ref``: the trainer's recorded world size (from ``client``,
    :func:`peek_client_state`'s result, read when not given), else the count of DeepSpeed's per-rank
    optimizer files; None when neither says."""
    client = (peek_client_state(ref) if client is None else client) or {}
    recorded = (client.get("train_state") or {}).get("world_size")
    if recorded:
        return int(recorded)
    optim = list(ref.path.glob("*zero_pp_rank_*_optim_states.pt")) or list(ref.path.glob("*_optim_states.pt"))
    return len(optim) or None


def universal_checkpoint(ref: CheckpointRef, rank: int, poll_s: float = 1.0) -> CheckpointRef:
    """``ref`` in DeepSpeed's universal format, as the ref to load (folder = the tag folder, tag
    ``universal``). Converted once: rank 0 runs ``ds_to_universal`` into a temporary folder and renames it
    into place; the other ranks wait for that folder (polling the file system, so a long conversion never
    meets a collective's timeout) and fail with rank 0's message if the conversion failed."""
    target, failed = ref.path / UNIVERSAL, ref.path / f"{UNIVERSAL}.failed"
    done = CheckpointRef(ref.path, UNIVERSAL)
    if rank == 0 and not target.is_dir():
        failed.unlink(missing_ok=True)
        try:
            _convert_to_universal(ref.path, target)
        except Exception as exc:
            write_text_atomic(failed, f"{exc}\n")
            raise
    while not target.is_dir():
        if failed.is_file():
            raise CheckpointError(f"converting {ref.path} to a universal checkpoint failed on rank 0: "
                                  f"{failed.read_text().strip()}")
        time.sleep(poll_s)
    return done


def _convert_to_universal(tag_folder: Path, target: Path) -> None:
    """DeepSpeed's converter in a process of its own (it forks workers, which a process holding a process
    group should not), its output kept in ``universal.log`` next to the result."""
    tmp = target.with_name(f"{UNIVERSAL}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted conversion left
    workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    log_file = tag_folder / f"{UNIVERSAL}.log"
    began = time.time()
    log.info("converting %s to a universal checkpoint (DeepSpeed's ds_to_universal, %d workers) ...", tag_folder,
             workers)
    with open(log_file, "w") as out:
        result = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                                 "--input_folder", str(tag_folder), "--output_folder", str(tmp),
                                 "--num_extract_workers", str(workers), "--num_merge_workers", str(workers),
                                 # ZeRO-1/2: the parallelism record Megatron writes, empty for plain data parallel
                                 "--inject_missing_state"],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        tail = log_file.read_text()[-2000:]
        raise CheckpointError(f"ds_to_universal could not convert {tag_folder} (exit {result.returncode}); the end "
                              f"of {log_file}:\n{tail}")
    os.replace(tmp, target)
    # ds_to_universal names its output folder in <tag>/latest_universal: name the folder's final place
    write_text_atomic(tag_folder / "latest_universal", UNIVERSAL)
    log.info("universal checkpoint %s written in %.1f s", target, time.time() - began)


def with_universal_load(ds_config: dict[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config whose engine loads universal checkpoints."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
