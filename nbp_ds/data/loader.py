"""Reading token shards for training and validation.

Every (rank, DataLoader worker) pair is a *slot*; slot s of W reads its own part of the shards.

* ``train``: an endless, deterministic stream. Each slot walks its shards in a fresh seeded order
  every epoch, through a seeded shuffle buffer, so the stream depends only on (seed, rank,
  world_size, num_workers). ``start_batch=k`` reproduces batches k, k+1, ... of a fresh loader
  exactly, which is what makes a resumed run continue where it stopped (the skipped samples are
  read and validated, not trained on).
* ``val``: one deterministic pass in which every sample is yielded exactly once across all slots;
  shards are divided among slots, or, when there are fewer shards than slots, samples are divided
  by their running index. The last partial batch is kept.

A corrupt member (bad npy bytes, missing tokens, unreadable cls/json), a sample of the wrong shape
and a truncated tar file are skipped, counted and logged, never fatal; ``TokenLoader.stats()`` sums
the counts of all workers for what has been yielded.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nbp_ds.data.schema import SampleError, WrongShape, decode_sample

log = logging.getLogger(__name__)


def expand_shards(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """A folder (its *.tar files, sorted), a brace pattern, a glob, a file, or a list of those."""
    if spec is None or spec == "" or spec == []:
        raise FileNotFoundError("no shards given (set data.train / data.val to a folder, pattern or list)")
    if isinstance(spec, (list, tuple)):
        return [path for item in spec for path in expand_shards(item)]
    spec = str(spec)
    if os.path.isdir(spec):
        found = sorted(str(p) for p in Path(spec).glob("*.tar") if not p.name.startswith("."))  # not temporaries
        if not found:
            raise FileNotFoundError(f"shard folder {spec!r} holds no .tar files")
        return found
    if "{" in spec:
        import braceexpand

        paths = list(braceexpand.braceexpand(spec))
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"shard pattern {spec!r}: {len(missing)} of {len(paths)} files missing, "
                                    f"first {missing[0]!r}")
        return paths
    if any(ch in spec for ch in "*?["):
        found = sorted(glob.glob(spec))
        if not found:
            raise FileNotFoundError(f"shard pattern {spec!r} matches no file")
        return found
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"shard {spec!r} does not exist")
    return [spec]


def iter_tar_samples(path: str, counts: Counter) -> Iterator[dict]:
    """Samples of one tar file in stored order, members grouped by key (WebDataset convention:
    the name up to the first dot of the file name). A truncated or unreadable tar ends the shard
    early and is counted as ``corrupt_shards``."""
    current: dict | None = None
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                key = f"{folder}/{stem}" if folder else stem
                if not dot:
                    continue
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__shard__": path}
                current[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        counts["corrupt_shards"] += 1
        log.warning("shard %s is truncated or unreadable after %s (%s); the rest of it is skipped",
                    path, current["__key__"] if current else "the start", exc)
        current = None  # the last sample may be incomplete
    if current is not None:
        yield current


class _SlotDataset(IterableDataset):
    def __init__(self, shards: list[str], grid, batch_size: int, mode: str, rank: int, world_size: int,
                 num_workers: int, seed: int, shuffle_buffer: int, start_batch: int):
        self.shards, self.grid, self.batch_size, self.mode = shards, tuple(grid), batch_size, mode
        self.rank, self.world_size, self.workers = rank, world_size, max(num_workers, 1)
        self.seed, self.shuffle_buffer, self.start_batch = seed, shuffle_buffer, start_batch
        self.with_keys = False

    # ---- sample streams -------------------------------------------------------------------------
    def _train_samples(self, slot: int, nslots: int, counts: Counter) -> Iterator[dict]:
        if len(self.shards) >= nslots:
            own = self.shards[slot::nslots]
        else:
            own = list(self.shards)
            if slot == 0:
                log.warning("%d shards for %d loader slots (ranks x workers): every slot resamples all shards "
                            "with its own seed; write more shards for disjoint reading", len(self.shards), nslots)
        epoch = 0
        while True:
            order = list(own)
            random.Random(f"order-{self.seed}-{slot}-{epoch}").shuffle(order)
            produced = 0
            for path in order:
                for sample in iter_tar_samples(path, counts):
                    produced += 1
                    yield sample
            if produced == 0:
                raise RuntimeError(f"loader slot {slot}: none of its {len(own)} shards yields a sample "
                                   f"(first {own[0]!r})")
            epoch += 1

    def _shuffled(self, samples: Iterator[dict], slot: int) -> Iterator[dict]:
        rng = random.Random(f"buffer-{self.seed}-{slot}")
        buffer: list[dict] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _val_samples(self, slot: int, nslots: int, counts: Counter) -> Iterator[dict]:
        if len(self.shards) >= nslots:
            for path in self.shards[slot::nslots]:
                yield from iter_tar_samples(path, counts)
            return
        index = 0  # fewer shards than slots: divide samples by running index
        for path in self.shards:
            for sample in iter_tar_samples(path, counts):
                if index % nslots == slot:
                    yield sample
                index += 1

    # ---- batches --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if self.mode == "train":
            # a resumed DataLoader asks worker 0 first, but batch start_batch came from worker
            # start_batch % n: rotate the roles so that each worker continues the right stream
            worker = (worker + self.start_batch) % self.workers
        slot, nslots = self.rank * self.workers + worker, self.world_size * self.workers
        counts: Counter = Counter()
        if self.mode == "train":
            samples = self._shuffled(self._train_samples(slot, nslots, counts), slot)
            # the DataLoader hands out worker batches round-robin: worker w made batches w, w+n, ...
            skip = max(0, (self.start_batch - worker + self.workers - 1) // self.workers)
        else:
            samples, skip = self._val_samples(slot, nslots, counts), 0
        tokens, labels, keys = [], [], []
        # the endless train stream meets the same bad member every epoch: warn once per (shard, key) in
        # this slot, count every time
        warned: set[tuple[str, str]] = set()
        for sample in samples:
            try:
                t, label, _ = decode_sample(sample, self.grid)
            except SampleError as exc:
                kind = "bad_shape" if isinstance(exc, WrongShape) else "corrupt"
                counts[kind] += 1
                where = (str(sample.get("__shard__")), str(sample.get("__key__")))
                if where not in warned:
                    warned.add(where)
                    log.warning("skipping a sample of %s: %s (warned once; every skip is counted in stats)",
                                where[0], exc)
                continue
            tokens.append(t)
            labels.append(label)
            keys.append(sample["__key__"])
            if len(tokens) == self.batch_size:
                if skip > 0:  # already trained on before the restart; its skips were reported then
                    skip -= 1
                    counts.clear()
                else:
                    batch = _collate(tokens, labels, keys if self.with_keys else None, counts)
                    counts.clear()  # the same Counter: the tar readers keep adding to it
                    yield batch
                tokens, labels, keys = [], [], []
        if tokens:
            yield _collate(tokens, labels, keys if self.with_keys else None, counts)
        elif counts:
            yield {"_counts": dict(counts), "_stats_only": True}


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on ``device`` (pinned-memory copies do not block); other entries as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _collate(tokens: list[np.ndarray], labels: list[int], keys: list[str] | None, counts: Counter) -> dict:
    batch = {"tokens": torch.from_numpy(np.stack(tokens)), "label": torch.tensor(labels, dtype=torch.long),
             "_counts": dict(counts)}
    if keys is not None:
        batch["key"] = keys
    return batch


class TokenLoader:
    """Iterable of batches ``{"tokens": LongTensor[B,T,H,W], "label": LongTensor[B]}`` (label -1 when
    unlabelled); see the module docstring for the train / val semantics."""

    def __init__(self, dataset: _SlotDataset, num_workers: int):
        self.dataset, self.num_workers = dataset, num_workers
        self._stats: Counter = Counter()

    def __iter__(self) -> Iterator[dict]:
        kwargs = {"prefetch_factor": 4} if self.num_workers > 0 else {}
        # a private generator: otherwise every new iterator draws its worker base seed from the global torch
        # RNG, and a resumed run (which creates its iterator after restoring that RNG) would drift from the
        # straight run (class dropout and sampling use the global RNG); our streams are seeded explicitly
        # pinned batches on a GPU machine: a copy from pageable memory makes the host wait for the GPU's queue
        # (CUDA syncs the stream before it), which would stall every training step at its first micro-batch
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(self.dataset.seed),
                            pin_memory=torch.cuda.is_available(), **kwargs)
        for item in loader:
            self._stats.update(item.pop("_counts"))
            if item.pop("_stats_only", False):
                continue
            self._stats["samples"] += item["tokens"].shape[0]
            self._stats["batches"] += 1
            yield item

    def stats(self) -> dict:
        """{"samples", "batches", "corrupt", "bad_shape", "corrupt_shards"} yielded/seen so far."""
        return {key: self._stats.get(key, 0) for key in ("samples", "batches", "corrupt", "bad_shape",
                                                         "corrupt_shards")}


def build_loader(spec, *, grid, batch_size: int, mode: str, rank: int = 0, world_size: int = 1,
                 num_workers: int = 2, seed: int = 0, shuffle_buffer: int = 1000, start_batch: int = 0,
                 with_keys: bool = False) -> TokenLoader:
    """A loader over token shards; ``mode`` is ``train`` (endless, shuffled, resumable at
    ``start_batch``) or ``val`` (one exact pass). ``with_keys`` adds each batch's sample keys as
    ``batch["key"]`` (a list of str), for checks and evaluation."""
    if mode not in ("train", "val"):
        raise ValueError(f"mode must be 'train' or 'val', got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    shards = expand_shards(spec)
    dataset = _SlotDataset(shards, grid, batch_size, mode, rank, world_size, num_workers, seed,
                           max(shuffle_buffer, 1), start_batch if mode == "train" else 0)
    dataset.with_keys = with_keys
    return TokenLoader(dataset, num_workers)
