"""Checkpoints that survive preemption, for every trainer in nbp_ds.

A checkpoints folder holds one tag folder per save (``step00001000``) and a ``latest`` file naming the
last complete one. :class:`CheckpointManager` runs a save in the order that keeps ``latest`` true:
every rank writes its part of the tag folder (every registered :class:`CheckpointPart` in
registration order: DeepSpeed's sharded states, a moving average, the data
loader's position as a small per-rank record ``rankNNNNN_data.json``; last, always, its own RNG
streams), then all ranks agree on how that went, the ranks hash a share of the files each for the
manifest, and only when every rank succeeded does rank 0 move ``latest`` (atomically) and delete tags
beyond ``keep_last``, never the one ``latest`` names. A process killed at any point leaves ``latest``
naming a complete checkpoint. :meth:`CheckpointManager.load` walks the same registry in the same order,
so what a save writes and what a resume reads are one list (torchtitan's ``states``).

**A failed save.** The agreement is a gathering of every rank's error (None when its part is written),
bounded by the process group's timeout (``train.collective_timeout_s``), not a barrier: a rank whose write
fails (a full disk) tells the others instead of leaving them waiting, and a rank that hangs makes them
raise after the timeout. Then every rank raises :class:`CheckpointSaveError` naming the folder and each
rank's error, rank 0 removes the incomplete tag folder, and ``latest`` still names the previous
checkpoint, from which a restart resumes.

**Checked before a resume.** Every save writes ``manifest.json`` (:mod:`nbp_ds.runtime.manifest`: each
file's size and hash, the step, the world size) before ``latest`` moves. :meth:`CheckpointManager.latest_intact`
checks the checkpoint ``latest`` names against it and, when a file is missing, truncated or changed, falls
back to the newest intact earlier one with a warning naming the file; with checkpoints but none intact it
refuses to start rather than train from step 0 again.

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
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from nbp_ds.errors import CheckpointError
from nbp_ds.files import atomic_output, write_text_atomic
from nbp_ds.runtime import distributed, manifest
from nbp_ds.runtime.rng import rng_state, set_rng_state

log = logging.getLogger(__name__)

LATEST = "latest"
TAG_PREFIX = "step"


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be saved on some rank (raised on every rank); ``latest`` did not move."""


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


def _tag_order(tag: str) -> tuple[int, str]:
    # by step number, not by text: past 10^8 steps the tags grow a ninth digit ("step100000000" < "step99999999")
    step = CheckpointRef(Path(), tag).step
    return (-1 if step is None else step, tag)


def step_tags(folder: Path) -> list[str]:
    """The checkpoint tags (``step...`` sub-folders) in ``folder``, oldest step first."""
    return sorted((p.name for p in Path(folder).glob(f"{TAG_PREFIX}*") if p.is_dir()), key=_tag_order)


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


def _rng_file(ref: CheckpointRef, rank: int) -> Path:
    return ref.path / f"rank{rank:05d}_rng.pt"


def _rank_state_file(ref: CheckpointRef, rank: int) -> Path:
    return ref.path / f"rank{rank:05d}_data.json"


class Stateful(Protocol):
    """What a part keeps as one state (a model with its optimizer, a trainer's counters, a loader's position)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointPart(Protocol):
    """One stateful part of a run as its checkpoints keep it. ``save`` writes this rank's share of the part into
    the tag folder ``ref.path``; ``load`` reads the same files back into the part."""

    def save(self, ref: CheckpointRef) -> None: ...

    def load(self, ref: CheckpointRef) -> None: ...


class RngStreams:
    """This rank's random streams (Python, NumPy, torch, CUDA), one file per rank: every checkpoint has them."""

    def __init__(self, rank: int):
        self.rank = rank

    def save(self, ref: CheckpointRef) -> None:
        with atomic_output(_rng_file(ref, self.rank)) as tmp:
            torch.save(rng_state(), tmp)

    def load(self, ref: CheckpointRef) -> None:
        file = _rng_file(ref, self.rank)
        if not file.is_file():  # saved by fewer processes
            log.warning("rank %d: %s holds no RNG state for this rank (saved by fewer processes): its random "
                        "streams (class dropout) start from the seed", self.rank, ref.path)
            return
        set_rng_state(torch.load(file, weights_only=False))


def save_rank_state(ref: CheckpointRef, rank: int, record: dict[str, Any]) -> None:
    """Keep ``record``, a small JSON-ready record of rank ``rank``'s own, with checkpoint ``ref``
    (read back by :meth:`CheckpointManager.rank_state` / :meth:`CheckpointManager.rank_states`)."""
    write_text_atomic(_rank_state_file(ref, rank), json.dumps(record))


class CheckpointManager:
    """Saves and finds the checkpoints of one run folder (see the module docstring for the order)."""

    def __init__(self, folder: str | Path, keep_last: int, rank: int):
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.rank = rank
        self.parts: dict[str, CheckpointPart] = {"rng": RngStreams(rank)}

    def register(self, name: str, part: CheckpointPart) -> None:
        """Add a part that every save writes and every :meth:`load` restores, after those registered before
        it (the RNG streams stay last)."""
        if name in self.parts:
            raise ValueError(f"a checkpoint part named {name!r} is already registered")
        rng = self.parts.pop("rng")
        self.parts.update({name: part, "rng": rng})

    def latest(self) -> CheckpointRef | None:
        tag = read_latest(self.folder)
        return CheckpointRef(self.folder, tag) if tag else None

    def save(self, step: int, written: Callable[[CheckpointRef], None] | None = None) -> CheckpointRef:
        """Every rank calls this: every registered part saves this rank's share of itself, in registration
        order; ``written(ref)`` is told when all of this rank's files are on disk; the ranks hash a share of the
        files each for the manifest; then ``latest`` moves. Raises :class:`CheckpointSaveError` on every rank
        when any rank failed (``latest`` stays where it was)."""
        ref = CheckpointRef(self.folder, tag_for(step))
        began = time.time()
        if self.rank == 0:
            self._remove_leftover(ref)
        distributed.barrier()  # nobody writes into a leftover folder before it is gone
        self._agree(ref, lambda: self._write_parts(ref, written))
        listing = self._agree(ref, lambda: manifest.list_files(ref.path) if self.rank == 0 else None)[0]
        mine = manifest.shares(listing, distributed.world_size())[self.rank]
        files = {name: record for hashed in self._agree(ref, lambda: manifest.hash_files(ref.path, mine))
                 for name, record in hashed.items()}
        # rank 0 commits; the others wait to hear how that went (nobody runs ahead and, say, saves again)
        self._agree(ref, lambda: self._commit(ref, files, step) if self.rank == 0 else None)
        self._log0("saved checkpoint %s in %.1f s", ref.path, time.time() - began)
        return ref

    def _write_parts(self, ref: CheckpointRef, written: Callable[[CheckpointRef], None] | None) -> None:
        ref.path.mkdir(parents=True, exist_ok=True)
        for part in self.parts.values():
            part.save(ref)
        if written is not None:
            written(ref)

    def _commit(self, ref: CheckpointRef, files: dict[str, dict[str, Any]], step: int) -> None:
        manifest.write_manifest(ref.path, files, step, distributed.world_size())
        write_text_atomic(self.folder / LATEST, ref.tag)
        self._prune()

    def _agree(self, ref: CheckpointRef, action: Callable[[], Any]) -> list[Any]:
        """Run ``action`` on this rank; every rank's result, in rank order, once every rank has finished its
        own. When any rank's action raised, every rank raises :class:`CheckpointSaveError` naming them all."""
        try:
            result, error = action(), None
        except Exception as exc:  # any failure must reach the other ranks, not only OSError
            log.error("%s: %s", type(exc).__name__, exc)
            result, error = None, f"{type(exc).__name__}: {exc}"
        try:
            outcomes = distributed.all_gather_object((result, error))
        except RuntimeError as exc:  # a peer died or hung past the collective timeout
            raise CheckpointSaveError(f"checkpoint {ref.path} was not saved: not every rank finished its part "
                                      f"(train.collective_timeout_s): {exc}") from exc
        failed = [f"rank {rank}: {message}" for rank, (_, message) in enumerate(outcomes) if message]
        if not failed:
            return [result for result, _ in outcomes]
        previous = read_latest(self.folder)
        if self.rank == 0 and previous != ref.tag:
            shutil.rmtree(ref.path, ignore_errors=True)  # on a full disk this also gives the space back
        resume = f"a restart resumes from {self.folder / previous}" if previous else "no earlier checkpoint"
        raise CheckpointSaveError(f"checkpoint {ref.path} was not saved ({'; '.join(failed)}); 'latest' still names "
                                  f"{previous or 'nothing'}: free the space or fix the file system, and {resume}")

    def _remove_leftover(self, ref: CheckpointRef) -> None:
        """A folder for this tag that ``latest`` does not name is what an interrupted save left: stale files
        of it must not end up in the new checkpoint."""
        if ref.path.is_dir() and read_latest(self.folder) != ref.tag:
            log.warning("removing %s, left by a save that did not finish", ref.path)
            shutil.rmtree(ref.path)

    def _log0(self, *args) -> None:
        if self.rank == 0:
            log.info(*args)

    # ---- checking before a resume (collectives: every rank calls these) --------------------------------
    def damage(self, ref: CheckpointRef) -> list[str]:
        """What is wrong with ``ref`` against its manifest, each problem naming the file (empty: intact).
        Every rank checks a share of the files; all get the whole answer."""
        problems: list[str] = []
        if not ref.path.is_dir():
            problems.append(f"{ref.path} does not exist")
        elif (record := manifest.read_manifest(ref.path)) is None:
            problems.append(f"{ref.path / manifest.MANIFEST} is missing or unreadable: the save never finished")
        else:
            mine = manifest.shares([(name, f["size"]) for name, f in record["files"].items()],
                                   distributed.world_size())[self.rank]
            try:
                problems += manifest.check_files(ref.path, record, mine)
            except OSError as exc:
                problems.append(f"{exc}")
        return sorted({p for found in distributed.all_gather_object(problems) for p in found})

    def require_intact(self, ref: CheckpointRef) -> CheckpointRef:
        """``ref`` when its files match its manifest, else a :class:`CheckpointError` naming what is wrong."""
        if problems := self.damage(ref):
            raise CheckpointError(f"checkpoint {ref.path} is damaged: {'; '.join(problems)}")
        return ref

    def latest_intact(self) -> CheckpointRef | None:
        """The checkpoint to resume from: the one ``latest`` names when it is intact, else the newest intact
        earlier one (with a warning naming what is wrong with each newer one); None when the folder holds no
        checkpoint at all. A folder with checkpoints but none intact is an error, never a start from step 0."""
        latest_file = self.folder / LATEST
        latest = latest_file.read_text().strip() if latest_file.is_file() else None
        newest_first = step_tags(self.folder)[::-1]
        candidates = ([latest, *(t for t in newest_first if _tag_order(t) < _tag_order(latest))] if latest
                      else newest_first)
        damaged = []
        for tag in candidates:
            ref = CheckpointRef(self.folder, tag)
            if not (problems := self.damage(ref)):
                if damaged and self.rank == 0:
                    log.warning("resuming from %s, the newest intact checkpoint, instead of %s", ref.path,
                                ", ".join(damaged))
                return ref
            damaged.append(tag)
            if self.rank == 0:
                log.warning("checkpoint %s is damaged, not resuming from it: %s", ref.path, "; ".join(problems))
        if candidates:
            raise CheckpointError(f"{self.folder} holds checkpoints ({', '.join(candidates)}) but none is intact "
                                  f"(see the warnings above): restore one, or move the folder away to start afresh")
        return None

    def load(self, ref: CheckpointRef) -> None:
        """Every registered part as it was at ``ref``, in the order a save wrote them."""
        for part in self.parts.values():
            part.load(ref)

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
        tags = step_tags(self.folder)
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
