"""One loader slot's endless training stream, as a state machine whose state is small.

A *slot* is one (rank, DataLoader worker role) pair; slot s of N reads its own part of each source.
For every source, a :class:`SourceCursor` walks the slot's shards epoch after epoch, each epoch in a
fresh seeded order; a seeded draw picks the source of each sample (by the mixture weights; no draw with
one source); a shuffle buffer of ``buffer_size`` samples mixes them (each new sample takes the place of
a random one, which is yielded). So the stream depends only on (sources, seed, slot, N, buffer size).

The state (:meth:`SlotStream.state_dict`) is, per source, the epoch, its plan when it is not the regular
one, the position in the plan and the next sample's ordinal in the current shard; the two RNG states;
and the buffer as references ``(source, shard, ordinal)``. Restoring it reads the buffered samples again
(a seek each on local tars) and opens the current shard at its offset: the cost does not grow with the
samples already seen. A *plan* is a list of items ``{"shard": i, "from": k}`` (the shard's samples from
ordinal k on) or ``{"shard": i, "only": [k, ...]}`` (these samples); the regular plan of an epoch is
every own shard from 0, and a custom plan comes from :func:`nbp_ds.data.resume.reshard`.
"""

from __future__ import annotations

import bisect
import logging
import random
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np

from nbp_ds.data.report import DataReport
from nbp_ds.data.shards import RetryPolicy, read_samples_at, read_shard
from nbp_ds.data.sources import Source

log = logging.getLogger(__name__)


def own_shards(n_shards: int, slot: int, nslots: int) -> list[int]:
    """The shards slot ``slot`` of ``nslots`` reads: every nslots-th; all of them when there are fewer
    shards than slots (each slot then resamples them all in its own order)."""
    return list(range(slot, n_shards, nslots)) if n_shards >= nslots else list(range(n_shards))


def regular_plan(n_shards: int, source_index: int, slot: int, nslots: int, seed: int, epoch: int) -> list[dict]:
    order = own_shards(n_shards, slot, nslots)
    # source 0 keeps the seed text of the single-source loader, so its order is the one it always had
    tag = "order" if source_index == 0 else f"order{source_index}"
    random.Random(f"{tag}-{seed}-{slot}-{epoch}").shuffle(order)
    return [{"shard": shard, "from": 0} for shard in order]


def fresh_cursor_state() -> dict[str, Any]:
    return {"epoch": 0, "plan": None, "pos": 0, "next": 0, "epoch_samples": 0}


class SourceCursor:
    """Where one slot is in one source (see the module docstring); :meth:`next_sample` advances it."""

    def __init__(self, index: int, source: Source, slot: int, nslots: int, seed: int, policy: RetryPolicy,
                 report: DataReport):
        self.index, self.source, self.slot, self.nslots, self.seed = index, source, slot, nslots, seed
        self.policy, self.report = policy, report
        self.load_state(fresh_cursor_state())

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "plan": self.plan, "pos": self.pos, "next": self.next,
                "epoch_samples": self.epoch_samples}

    def load_state(self, state: dict[str, Any]) -> None:
        self.epoch, self.plan, self.pos = state["epoch"], state["plan"], state["pos"]
        self.next, self.epoch_samples = state["next"], state["epoch_samples"]
        self._items: list[dict] | None = None
        self._reader: Iterator[tuple[int, dict]] | None = None

    def items(self) -> list[dict]:
        if self._items is None:
            self._items = self.plan if self.plan is not None else regular_plan(
                len(self.source.shards), self.index, self.slot, self.nslots, self.seed, self.epoch)
        return self._items

    def next_sample(self) -> tuple[int, int, dict]:
        """(shard index, ordinal, raw sample) of the next sample; epochs follow each other endlessly."""
        while True:
            items = self.items()
            if self._reader is None:
                if self.pos >= len(items):
                    self._next_epoch()
                    continue
                self._reader = self._open(items[self.pos])
            step = next(self._reader, None)
            if step is None:
                self._reader, self.pos, self.next = None, self.pos + 1, 0
                continue
            ordinal, sample = step
            self.next = ordinal + 1
            self.epoch_samples += 1
            return items[self.pos]["shard"], ordinal, sample

    def _open(self, item: dict) -> Iterator[tuple[int, dict]]:
        url = self.source.shards[item["shard"]]
        if "only" in item:
            wanted = [o for o in item["only"] if o >= self.next]
            return _only(url, wanted, self.policy, self.report) if wanted else iter(())
        return read_shard(url, max(item["from"], self.next), policy=self.policy, report=self.report)

    def _next_epoch(self) -> None:
        if self.plan is None and self.epoch_samples == 0:
            raise RuntimeError(f"loader slot {self.slot}: none of its {len(self.items())} shards of source "
                               f"{self.source.name!r} yields a sample (first {self.source.shards[0]!r}); see the "
                               f"warnings above")
        self.load_state({**fresh_cursor_state(), "epoch": self.epoch + 1})


def _only(url: str, wanted: list[int], policy: RetryPolicy, report: DataReport) -> Iterator[tuple[int, dict]]:
    keep, last = set(wanted), wanted[-1]
    for ordinal, sample in read_shard(url, wanted[0], policy=policy, report=report):
        if ordinal in keep:
            yield ordinal, sample
        if ordinal >= last:
            return


class SlotStream:
    """The raw samples one slot yields (before decoding), and their resumable state."""

    def __init__(self, sources: list[Source], slot: int, nslots: int, seed: int, buffer_size: int,
                 policy: RetryPolicy, report: DataReport):
        self.sources, self.slot, self.nslots, self.seed = sources, slot, nslots, seed
        self.buffer_size, self.policy, self.report = buffer_size, policy, report
        self.cursors = [SourceCursor(i, s, slot, nslots, seed, policy, report) for i, s in enumerate(sources)]
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.cumulative = list(np.cumsum(weights / weights.sum()))
        self.buffer: list[dict] = []
        self.refs = np.zeros((buffer_size, 3), dtype=np.int64)  # (source, shard, ordinal) of buffer[i]
        self.generation = 0
        self._seed_rngs()

    def _seed_rngs(self) -> None:
        # generation 0 keeps the seed texts of the single-source loader; a resharded stream starts fresh ones
        suffix = f"-g{self.generation}" if self.generation else ""
        self.buffer_rng = random.Random(f"buffer-{self.seed}-{self.slot}{suffix}")
        self.mix_rng = random.Random(f"mix-{self.seed}-{self.slot}{suffix}")

    def _pick(self) -> int:
        if len(self.cursors) == 1:
            return 0
        return min(bisect.bisect_right(self.cumulative, self.mix_rng.random()), len(self.cursors) - 1)

    def next_sample(self) -> dict:
        """The next raw sample out of the shuffle buffer (``__source__`` added: its source's index)."""
        while True:
            source = self._pick()
            shard, ordinal, sample = self.cursors[source].next_sample()
            sample["__source__"] = source
            n = len(self.buffer)
            if n < self.buffer_size:
                self.refs[n] = (source, shard, ordinal)
                self.buffer.append(sample)
                continue
            i = self.buffer_rng.randrange(n)
            out, self.buffer[i] = self.buffer[i], sample
            self.refs[i] = (source, shard, ordinal)
            return out

    # ---- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the stream is (cheap: taken after every batch). The RNG states are Python tuples and the
        buffer an int64 array; :func:`nbp_ds.data.resume.to_json` makes it JSON."""
        return {"slot": self.slot, "nslots": self.nslots, "generation": self.generation,
                "sources": [c.state() for c in self.cursors],
                "mix_rng": self.mix_rng.getstate() if len(self.cursors) > 1 else None,
                "buffer_rng": self.buffer_rng.getstate(), "buffer": self.refs[: len(self.buffer)].copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (of this slot and layout): cursors, RNGs, and the buffer read again."""
        if (state["slot"], state["nslots"]) != (self.slot, self.nslots):
            raise ValueError(f"loader state of slot {state['slot']} of {state['nslots']} given to slot "
                             f"{self.slot} of {self.nslots}: reshard it first (nbp_ds.data.resume)")
        self.generation = state.get("generation", 0)
        self._seed_rngs()
        for cursor, cursor_state in zip(self.cursors, state["sources"], strict=True):
            cursor.load_state(cursor_state)
        if state.get("mix_rng") is not None:
            self.mix_rng.setstate(_rng_tuple(state["mix_rng"]))
        if state.get("buffer_rng") is not None:
            self.buffer_rng.setstate(_rng_tuple(state["buffer_rng"]))
        refs = np.asarray(state.get("buffer", []), dtype=np.int64).reshape(-1, 3)
        if len(refs) > self.buffer_size:
            raise ValueError(f"loader state of slot {self.slot} buffers {len(refs)} samples, more than "
                             f"data.shuffle_buffer={self.buffer_size}: reshard it first (nbp_ds.data.resume)")
        self._refill(refs)

    def _refill(self, refs: np.ndarray) -> None:
        """Read the buffered samples again, in their buffer order; one that cannot be read is left out."""
        began = time.perf_counter()
        by_shard: dict[tuple[int, int], list[int]] = defaultdict(list)
        for source, shard, ordinal in refs.tolist():
            by_shard[(source, shard)].append(ordinal)
        found = {}
        for (source, shard), ordinals in by_shard.items():
            url = self.sources[source].shards[shard]
            for ordinal, sample in read_samples_at(url, ordinals, policy=self.policy, report=self.report).items():
                sample["__source__"] = source
                found[(source, shard, ordinal)] = sample
        self.buffer = []
        for ref in refs.tolist():
            sample = found.get(tuple(ref))
            if sample is None:
                continue
            self.refs[len(self.buffer)] = ref
            self.buffer.append(sample)
        if len(self.buffer) < len(refs):
            log.warning("loader slot %d: %d of %d buffered samples could not be read again; the stream goes on "
                        "without them", self.slot, len(refs) - len(self.buffer), len(refs))
        log.debug("loader slot %d: shuffle buffer of %d samples read again from %d shards in %.2f s", self.slot,
                  len(self.buffer), len(by_shard), time.perf_counter() - began)


def _rng_tuple(state) -> tuple:
    """A ``random.Random`` state from its JSON form (lists for tuples)."""
    version, internal, gauss = state
    return version, tuple(internal), gauss
