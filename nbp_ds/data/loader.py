"""Reading token shards for training and validation.

Every (rank, DataLoader worker role) pair is a *slot*; slot s of N reads its own part of the shards
(nbp_ds.data.shards addresses and reads them, local or remote, with retries).

* ``train``: an endless, deterministic stream (nbp_ds.data.stream): each slot walks its shards of every
  source in a fresh seeded order every epoch, draws the source of each sample by the mixture weights,
  and mixes them through a seeded shuffle buffer, so the stream depends only on (sources, seed, rank,
  world_size, num_workers, shuffle buffer). :meth:`TokenLoader.state_dict` is where the stream is, small
  and saved with every checkpoint; :meth:`TokenLoader.load_state_dict` continues from it by seeking, not by
  reading again what was trained on (nbp_ds.data.resume: the record, and how it continues on another
  number of ranks or workers).
* ``val``: one deterministic pass in which every sample is yielded exactly once across all slots;
  shards are divided among slots, or, when there are fewer shards than slots, the samples of every shard
  are (sample ordinal + shard index modulo the slot count). The last partial batch is kept.

A corrupt member (bad npy bytes, missing tokens, unreadable cls/json), a sample of the wrong shape and
a shard that cannot be read (after its retries) are skipped, counted and logged, never fatal;
:meth:`TokenLoader.stats` sums the counts of all workers for what has been consumed, and
:attr:`TokenLoader.problems` names the first of them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nbp_ds.data.packer import PackedBatch, PackSpec
from nbp_ds.data.report import COUNTERS, DataReport
from nbp_ds.data.resume import FORMAT, reshard, same_layout, to_json
from nbp_ds.data.schema import SampleError, WrongShape, decode_sample
from nbp_ds.data.shards import RetryPolicy, read_shard
from nbp_ds.data.sources import Source, as_sources, fingerprint
from nbp_ds.data.stream import SlotStream
from nbp_ds.data.workers import loader_worker_context, start_workers

log = logging.getLogger(__name__)


class _SlotDataset(IterableDataset):
    """What one DataLoader worker runs: its slot's batches, each carrying the counts since the last one
    and (train) the slot's state after it."""

    def __init__(self, sources: list[Source], grid, batch_size: int, mode: str, rank: int, world_size: int,
                 num_workers: int, seed: int, shuffle_buffer: int, policy: RetryPolicy, with_keys: bool,
                 pack: PackSpec | None = None):
        self.sources, self.grid, self.batch_size, self.mode = sources, tuple(grid or ()) or None, batch_size, mode
        self.pack = pack
        self.rank, self.world_size, self.roles = rank, world_size, max(num_workers, 1)
        self.seed, self.shuffle_buffer, self.policy, self.with_keys = seed, shuffle_buffer, policy, with_keys
        # set by TokenLoader before each iteration: batches consumed so far, and each role's saved state
        self.consumed = 0
        self.slot_states: list[dict | None] = [None] * self.roles

    def new_batch(self):
        """An empty batch: ``batch_size`` clips of the run's grid, or ``batch_size`` packed rows."""
        if self.pack is not None:
            return PackedBatch(self.pack, self.batch_size, self.with_keys)
        return _Batch(self.with_keys)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        report = DataReport()
        if self.mode == "train":
            yield from self._train_batches(worker, report)
        else:
            yield from self._val_batches(worker, report)

    # ---- train -------------------------------------------------------------------------------------
    def _train_batches(self, worker: int, report: DataReport) -> Iterator[dict]:
        # the DataLoader asks worker 0 first, but batch `consumed` is role consumed % n's turn (role r made
        # batches r, r+n, ...): rotate the roles so that each worker continues the right stream
        role = (worker + self.consumed) % self.roles
        slot, nslots = self.rank * self.roles + role, self.world_size * self.roles
        for source in self.sources if slot == 0 else ():
            if len(source.shards) < nslots:
                log.warning("source %r: %d shards for %d loader slots (ranks x workers): every slot resamples all "
                            "its shards with its own seed; write more shards for disjoint reading", source.name,
                            len(source.shards), nslots)
        stream = SlotStream(self.sources, slot, nslots, self.seed, self.shuffle_buffer, self.policy, report)
        state = self.slot_states[role]
        if state is not None:
            stream.load_state_dict(state)
            skip = 0
        else:
            # batches this role made among the first `consumed`: zero, unless an old checkpoint (saved without
            # a loader state) is continued by reading its stream again up to where it was
            skip = max(0, -(-(self.consumed - role) // self.roles))
        batch = self.new_batch()
        unusable = _UnusableRun(stream, slot)
        while True:
            # a packed batch is closed by a sample it has no room for: it is saved from before that sample
            before = stream.state_dict() if batch.needs_snapshot else None
            sample = stream.next_sample()
            if not batch.add(sample, self.grid, self.sources, report):
                unusable.add(sample, batch.rejected)
                continue
            unusable.reset()
            if not batch.complete(self.batch_size):
                continue
            if skip > 0:  # trained on before the restart; its problems were reported then
                skip -= 1
                report.take()
                batch = batch.successor(report)
                continue
            yield batch.collate(report, (role, before if batch.holds_next else stream.state_dict()))
            batch = batch.successor(report)

    # ---- val ---------------------------------------------------------------------------------------
    def _val_batches(self, worker: int, report: DataReport) -> Iterator[dict]:
        slot, nslots = self.rank * self.roles + worker, self.world_size * self.roles
        shards = [url for source in self.sources for url in source.shards]
        batch = self.new_batch()
        for sample in self._val_samples(shards, slot, nslots, report):
            sample["__source__"] = 0
            if batch.add(sample, self.grid, None, report) and batch.complete(self.batch_size):
                yield batch.collate(report)
                batch = batch.successor(report)
        if len(batch):
            yield batch.collate(report)
        else:
            counts, problems = report.take()
            if counts or problems:
                yield {"_counts": counts, "_problems": problems, "_stats_only": True}

    def _val_samples(self, shards: list[str], slot: int, nslots: int, report: DataReport) -> Iterator[dict]:
        if len(shards) >= nslots:
            for url in shards[slot::nslots]:
                for _, sample in read_shard(url, policy=self.policy, report=report):
                    yield sample
            return
        for index, url in enumerate(shards):  # fewer shards than slots: divide every shard's samples
            for ordinal, sample in read_shard(url, policy=self.policy, report=report):
                if (ordinal + index) % nslots == slot:
                    yield sample


class _UnusableRun:
    """Samples in a row that a slot could not use. Training resamples its shards endlessly, so a slot whose
    every sample is corrupt or of another grid would read for ever and the run would hang without a step: once
    every source has gone round its shards ``EPOCHS`` more times and the shuffle buffer has been emptied twice
    over with nothing usable, the slot stops with an error naming a sample and what is wrong with it."""

    EPOCHS = 3  # whole passes over the slot's shards without one usable sample: no use in a fourth

    def __init__(self, stream: SlotStream, slot: int):
        self.stream, self.slot = stream, slot
        self.count, self.start_epochs = 0, self._epochs()

    def _epochs(self) -> list[int]:
        return [cursor.epoch for cursor in self.stream.cursors]

    def reset(self) -> None:
        self.count, self.start_epochs = 0, self._epochs()

    def add(self, sample: dict, why: SampleError | None) -> None:
        """One more unusable ``sample``; ``why`` it could not be used (the decoding error)."""
        self.count += 1
        if self.count <= 2 * self.stream.buffer_size:
            return
        if all(now - then >= self.EPOCHS for now, then in zip(self._epochs(), self.start_epochs, strict=True)):
            raise SampleError(
                f"loader slot {self.slot}: no usable sample in {self.count} in a row ({self.EPOCHS} passes over "
                f"its shards); the last one, from {sample.get('__shard__')}: {why} (data.train holds tokens of "
                f"another grid or tokenizer, or only damaged samples)")


class _Batch:
    """Decoded samples of the run's grid gathered into one batch."""

    needs_snapshot = False  # complete right after its last sample: saved with the stream's state after it
    holds_next = False

    def __init__(self, with_keys: bool):
        self.tokens: list[np.ndarray] = []
        self.labels: list[int] = []
        self.keys: list[str] | None = [] if with_keys else None
        self.rejected: SampleError | None = None  # why the last sample add() turned down could not be used

    def __len__(self) -> int:
        return len(self.tokens)

    def complete(self, batch_size: int) -> bool:
        return len(self) >= batch_size

    def successor(self, report: DataReport) -> _Batch:
        return _Batch(self.keys is not None)

    def add(self, sample: dict, grid, sources: list[Source] | None, report: DataReport) -> bool:
        """Decode and keep ``sample``; False (counted and reported) when it cannot be used."""
        try:
            tokens, label, _ = decode_sample(sample, grid)
        except SampleError as exc:
            self.rejected = exc
            kind = "bad_shape" if isinstance(exc, WrongShape) else "corrupt"
            shard = str(sample.get("__shard__"))
            report.problem(kind, f"{shard}: {exc}", place=(shard, str(sample.get("__key__"))))
            return False
        self.tokens.append(tokens)
        self.labels.append(label)
        if self.keys is not None:
            self.keys.append(sample["__key__"])
        if sources is not None:
            report.counts[f"source/{sources[sample['__source__']].name}"] += 1
        return True

    def collate(self, report: DataReport, state: tuple[int, dict] | None = None) -> dict:
        counts, problems = report.take()
        batch = {"tokens": torch.from_numpy(np.stack(self.tokens)),
                 "label": torch.tensor(self.labels, dtype=torch.long), "_counts": counts, "_problems": problems}
        if self.keys is not None:
            batch["key"] = self.keys
        if state is not None:
            batch["_state"] = state
        return batch


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on ``device`` (pinned-memory copies do not block); other entries as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class TokenLoader:
    """Iterable of batches ``{"tokens": LongTensor[B,T,H,W], "label": LongTensor[B]}`` (label -1 when
    unlabelled); see the module docstring for the train / val semantics. A train loader is stateful: a new
    iteration continues after the last batch consumed, and :meth:`state_dict` / :meth:`load_state_dict`
    carry that across processes."""

    def __init__(self, dataset: _SlotDataset, num_workers: int):
        self.dataset, self.num_workers = dataset, num_workers
        self.report = DataReport()
        self.consumed = 0

    def __iter__(self) -> Iterator[dict]:
        dataset = copy.copy(self.dataset)
        dataset.consumed, dataset.slot_states = self.consumed, list(self.dataset.slot_states)
        kwargs = ({"prefetch_factor": 4, "multiprocessing_context": loader_worker_context()}
                  if self.num_workers > 0 else {})
        # a private generator: otherwise every new iterator draws its worker base seed from the global torch
        # RNG, and a resumed run (which creates its iterator after restoring that RNG) would drift from the
        # straight run (class dropout and sampling use the global RNG); our streams are seeded explicitly
        # pinned batches on a GPU machine: a copy from pageable memory makes the host wait for the GPU's queue
        # (CUDA syncs the stream before it), which would stall every training step at its first micro-batch
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(self.dataset.seed),
                            pin_memory=torch.cuda.is_available(), **kwargs)
        for item in start_workers(loader):
            self.report.add(item.pop("_counts"), item.pop("_problems"))
            if item.pop("_stats_only", False):
                continue
            if "_state" in item:
                role, state = item.pop("_state")
                self.dataset.slot_states[role] = state
            self.report.counts["samples"] += item["tokens"].shape[0] if "tokens" in item else item["clips"]
            self.report.counts["batches"] += 1
            self.consumed += 1
            yield item

    def stats(self) -> dict[str, int]:
        """The counters of what has been consumed so far (and, restored, before): every name of
        :data:`~nbp_ds.data.report.COUNTERS` and ``source/<name>`` for each training source, in a fixed order
        (the same on every rank, so they can be reduced together)."""
        names = list(COUNTERS)
        if self.dataset.mode == "train":
            names += [f"source/{s.name}" for s in self.dataset.sources]
        return {key: int(self.report.counts.get(key, 0)) for key in names}

    @property
    def sources(self) -> list[Source]:
        return self.dataset.sources

    @property
    def problems(self) -> list[str]:
        """The first problems met (corrupt members, shards given up), one line each naming the shard."""
        return list(self.report.problems)

    # ---- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's stream position as a JSON-ready record (nbp_ds.data.resume)."""
        ds = self.dataset
        return {"format": FORMAT, "rank": ds.rank, "world_size": ds.world_size, "num_workers": ds.roles,
                "shuffle_buffer": ds.shuffle_buffer, "seed": ds.seed, "fingerprint": fingerprint(ds.sources),
                "batches": self.consumed, "slots": to_json(ds.slot_states), "stats": dict(self.report.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Continue from ``state``, this rank's record of the same layout (or one :func:`~nbp_ds.data.resume.reshard`
        made). The counters always continue; the stream position only when the sources are the same shards
        as when it was saved (returns whether it did; otherwise the stream starts afresh, with a warning)."""
        ds = self.dataset
        if state.get("format") != FORMAT:
            raise ValueError(f"loader state format {state.get('format')!r}, this version reads {FORMAT}")
        if state["rank"] != ds.rank or not same_layout(state, ds.world_size, ds.roles, ds.shuffle_buffer):
            raise ValueError(f"loader state of rank {state['rank']} of {state['world_size']} x {state['num_workers']} "
                             f"workers (buffer {state['shuffle_buffer']}) given to rank {ds.rank} of {ds.world_size} "
                             f"x {ds.roles} (buffer {ds.shuffle_buffer}): reshard it first (nbp_ds.data.resume)")
        self.report.counts.update(state.get("stats", {}))
        if state["fingerprint"] != fingerprint(ds.sources):
            log.warning("the training shards differ from those of the saved data position: the data stream starts "
                        "afresh (samples already trained on may come again)")
            return False
        if state["seed"] != ds.seed:
            log.warning("train.seed changed from %s to %s: the saved data position is kept, later epochs follow "
                        "the new seed", state["seed"], ds.seed)
        self.consumed = state["batches"]
        ds.slot_states = list(state["slots"])
        return True


def build_loader(spec, *, grid, batch_size: int, mode: str, rank: int = 0, world_size: int = 1,
                 num_workers: int = 2, seed: int = 0, shuffle_buffer: int = 1000, start_batch: int = 0,
                 with_keys: bool = False, retries: int = 3, retry_backoff: float = 1.0,
                 pack: PackSpec | None = None) -> TokenLoader:
    """A loader over token shards; ``spec`` is a ``data.train`` / ``data.val`` value (shards or, for train,
    a mixture) or a list of :class:`~nbp_ds.data.sources.Source`. ``mode`` is ``train`` (endless,
    shuffled, stateful) or ``val`` (one exact pass). ``start_batch`` continues a train stream saved
    without a loader state (older checkpoints) by reading it again up to that batch. ``with_keys`` adds
    each batch's sample keys as ``batch["key"]`` (a list of str). A shard that fails is read again up to
    ``retries`` times, the first after ``retry_backoff`` seconds. With ``pack``, samples of any grid are packed
    into ``batch_size`` rows of ``pack.tokens`` positions (nbp_ds.data.packer; ``grid`` is then not read)."""
    if mode not in ("train", "val"):
        raise ValueError(f"mode must be 'train' or 'val', got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    sources = as_sources(spec)
    dataset = _SlotDataset(sources, grid, batch_size, mode, rank, world_size, num_workers, seed,
                           max(shuffle_buffer, 1), RetryPolicy(retries, retry_backoff), with_keys, pack)
    loader = TokenLoader(dataset, num_workers)
    if mode == "train":
        loader.consumed = start_batch
    return loader


def restore(loader: TokenLoader, own: dict[str, Any] | None, read_all: Callable[[], list[dict[str, Any]]],
            replay_batches: int | None = None) -> str:
    """Put a fresh training loader where a checkpoint left the stream, and say how (for the log).

    ``own`` is this rank's saved record (None if it kept none); ``read_all`` reads every rank's, needed
    only when the layout changed; ``replay_batches`` continues a checkpoint saved before loaders had a
    state (it read the stream again up to that batch; same layout only)."""
    ds = loader.dataset
    if own is not None and same_layout(own, ds.world_size, ds.roles, ds.shuffle_buffer):
        if loader.load_state_dict(own):
            return f"continues at batch {own['batches']} of this rank (seeks, nothing is read again)"
        return "starts afresh: the training shards changed"
    states = read_all()
    if states:
        if states[0]["fingerprint"] != fingerprint(ds.sources):
            log.warning("the training shards differ from those of the saved data position: the data stream "
                        "starts afresh (samples already trained on may come again)")
            return "starts afresh: the training shards changed"
        try:
            new = reshard(states, ds.sources, ds.world_size, ds.roles, ds.shuffle_buffer)[ds.rank]
        except ValueError as exc:
            log.warning("the saved data position cannot be continued (%s): the data stream starts afresh", exc)
            return "starts afresh: the saved position is incomplete"
        loader.load_state_dict(new)
        old = states[0]
        return (f"continues the interrupted epoch on {ds.world_size} ranks x {ds.roles} workers (saved by "
                f"{old['world_size']} x {old['num_workers']}, buffer {old['shuffle_buffer']}): its remaining "
                f"samples come once each, then new epochs")
    if replay_batches:
        loader.consumed = replay_batches
        return f"reads the stream again up to batch {replay_batches} (a checkpoint without a loader state)"
    log.warning("the checkpoint holds no data position for %d ranks: the data stream starts afresh", ds.world_size)
    return "starts afresh: no saved position"
