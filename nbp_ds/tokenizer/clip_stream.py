"""Training clips streamed from videos, in constant memory: what the tokenizer trainer reads.

The videos are split once (a seeded shuffle) over the ranks and, within a rank, over its DataLoader workers,
so each worker always reads the same share (its small cache of decoded videos then serves later epochs).
Every epoch a worker shuffles its share again and takes from each video ``clip.per_video`` fresh random
clips: a random start, optionally a random crop (``random_crop``: the video is decoded that much larger and
a window of the clip size is cut at random) and a horizontal flip. The randomness of a clip is a function of
(seed, epoch, video), so it does not depend on which worker or rank reads it.

Workers decode in their own processes and fill whole batches; the DataLoader hands the batches to the trainer
in a fixed worker cycle, so the sequence of batches is a function of the seed, the world size and the number
of workers. Each batch carries its worker's position after it (epoch, index in the shuffled share, clips
already taken from that video); :class:`ClipLoader` keeps the position of the last batch it handed out per
worker and the count of batches, which is the whole state a checkpoint needs: a resumed loader starts each
worker at its position and turns the worker cycle so that the next batch comes from the worker whose turn
it was. Videos that cannot be decoded, or are too short for a clip, are skipped, counted and listed.

Videos in WebDataset shards (:class:`~nbp_ds.tokenizer.video_shards.VideoShards`) are split the same way, whole
shards per worker (:class:`ShardClipStream`): every epoch a worker shuffles its shards and reads each one's
samples in stored order; a video member is written to a file in the worker's own temporary folder (ffmpeg
seeks in mp4), decoded and removed at once, and gives the same random clips, keyed by (seed, epoch, a hash of
shard and key). Its position is (epoch, index in the shuffled shards, sample ordinal in the shard, clips
taken); shards that cannot be read are retried, then skipped and counted (``ClipLoader.report``).
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nbp_ds.data.report import DataReport
from nbp_ds.data.shards import read_shard
from nbp_ds.data.workers import loader_worker_context, start_workers
from nbp_ds.tokenizer.dataset_listing import ListingError
from nbp_ds.tokenizer.video_shards import VideoShards, member_id, member_name, video_member
from nbp_ds.video_io import ClipSpec, ClipTooShort, VideoError, decode_video

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Augment:
    """Per-clip randomness beyond the start time: ``random_crop`` is the margin (a fraction of the clip side)
    the video is decoded larger by, ``flip`` a horizontal flip with probability 1/2."""

    random_crop: float = 0.0
    flip: bool = False

    def decoded_side(self, resolution: int) -> int:
        return int(round(resolution * (1.0 + self.random_crop)))


def random_clips(video: np.ndarray, frames: int, resolution: int, count: int, augment: Augment,
                 rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` random clips [frames, resolution, resolution, 3] of a decoded video [N, S, S, 3]."""
    if len(video) < frames:
        raise ClipTooShort("-", f"{len(video)} frames, a clip needs {frames}")
    clips = []
    side = video.shape[1]
    for _ in range(count):
        start = int(rng.integers(0, len(video) - frames + 1))
        y, x = (int(v) for v in rng.integers(0, side - resolution + 1, size=2))
        clip = video[start:start + frames, y:y + resolution, x:x + resolution]
        if augment.flip and rng.random() < 0.5:
            clip = clip[:, :, ::-1]
        clips.append(np.ascontiguousarray(clip))
    return clips


class DecodedVideos:
    """A worker's least-recently-used cache of decoded videos, bounded in bytes (0: no cache)."""

    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.videos: OrderedDict[str, np.ndarray] = OrderedDict()
        self.size = 0

    def get(self, path: str, decode) -> np.ndarray:
        if path in self.videos:
            self.videos.move_to_end(path)
            return self.videos[path]
        video = decode(path)
        if video.nbytes <= self.capacity:
            self.videos[path] = video
            self.size += video.nbytes
            while self.size > self.capacity:
                _, old = self.videos.popitem(last=False)
                self.size -= old.nbytes
        return video


class ClipBatcher:
    """The one loop that fills a worker's batches, whatever its clips come from (video files or the samples of a
    shard): :meth:`take_clips` takes every clip of each source in turn, skipping the sources that give none, and
    says after each full batch where the worker is, so that a resume continues exactly there."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.batch: list[np.ndarray] = []
        self.skipped: list[tuple[str, str]] = []  # (source, reason) since the last batch
        self.good = 0  # sources that gave clips

    def take_clips(self, sources: Iterable[tuple[int, str, Callable[[], list[np.ndarray]]]], taken: int
                   ) -> Iterator[tuple[int, int]]:
        """``sources``: (cursor, name, clips) in reading order, the cursor being the source's place (a video's index
        in the shuffled share, a sample's ordinal in its shard), ``clips`` what decodes it (ClipTooShort and
        VideoError: skipped, named). The first source continues after its first ``taken`` clips. Yields, whenever a
        batch is full (:meth:`pop`), the position after it: (cursor of the source to read next, its clips taken)."""
        for cursor, name, decode in sources:
            try:
                clips = decode()
            except (ClipTooShort, VideoError) as exc:
                self.skipped.append((name, exc.reason))
                taken = 0
                continue
            self.good += 1
            for clip in clips[taken:]:
                self.batch.append(clip)
                taken += 1
                if len(self.batch) == self.batch_size:
                    yield (cursor + 1, 0) if taken == len(clips) else (cursor, taken)
            taken = 0

    def pop(self) -> tuple[np.ndarray, list[tuple[str, str]]]:
        """The full batch and the sources skipped since the last one; both start empty again."""
        batch, skipped = np.stack(self.batch), self.skipped
        self.batch, self.skipped = [], []
        return batch, skipped


def worker_share(count: int, seed: int, rank: int, world: int, worker: int, workers: int) -> np.ndarray:
    """Indices of the videos (of ``count``) that loader worker ``worker`` of rank ``rank`` reads, every epoch."""
    order = np.random.default_rng([seed, 0x5EED]).permutation(count)
    return order[rank::world][worker::workers]


class VideoClipStream(IterableDataset):
    """Endless batches of random clips for one rank; each DataLoader worker reads its own share of videos."""

    @staticmethod
    def start(epoch: int) -> list[int]:
        """A worker's position at the start of ``epoch``: [epoch, index in the shuffled share, clips taken]."""
        return [epoch, 0, 0]

    def __init__(self, videos: list[str], clip: ClipSpec, batch_size: int, seed: int, rank: int, world: int,
                 workers: int, augment: Augment, cache_bytes: int, positions: list[list[int]], rotation: int):
        super().__init__()
        self.videos, self.clip, self.batch_size, self.seed = videos, clip, batch_size, seed
        self.rank, self.world, self.workers = rank, world, workers
        self.augment, self.cache_bytes = augment, cache_bytes
        self.positions, self.rotation = positions, rotation

    def _decode(self, path: str) -> np.ndarray:
        return decode_video(path, self.clip.fps, self.augment.decoded_side(self.clip.resolution))

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.rotation) % self.workers
        share = worker_share(len(self.videos), self.seed, self.rank, self.world, worker, self.workers)
        if len(share) == 0:
            raise ListingError(f"{len(self.videos)} training videos cannot feed {self.world} rank(s) x "
                               f"{self.workers} loader worker(s): lower data.workers")
        cache = DecodedVideos(self.cache_bytes)
        epoch, index, taken = self.positions[worker]
        batcher = ClipBatcher(self.batch_size)
        while True:
            order = np.random.default_rng([self.seed, epoch, 0xC11B]).permutation(len(share))
            whole_pass, batcher.good = index == 0, 0
            sources = ((i, self.videos[int(share[order[i]])], functools.partial(self._clips, int(share[order[i]]),
                                                                                epoch, cache))
                       for i in range(index, len(order)))
            for after in batcher.take_clips(sources, taken):  # (index, taken) after the batch
                clips, skipped = batcher.pop()
                yield {"clips": clips, "worker": worker, "position": [epoch, *after], "skipped": skipped}
            if whole_pass and batcher.good == 0:
                raise ListingError(f"none of the {len(share)} videos of rank {self.rank}, loader worker {worker} "
                                   f"gave a clip ({self.clip.describe()}); reasons: "
                                   f"{sorted({reason for _, reason in batcher.skipped})[:5]}")
            epoch, index, taken = epoch + 1, 0, 0

    def _clips(self, video_id: int, epoch: int, cache: DecodedVideos) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch, video_id])
        return random_clips(cache.get(self.videos[video_id], self._decode), self.clip.frames, self.clip.resolution,
                            self.clip.per_video, self.augment, rng)


class ShardClipStream(IterableDataset):
    """Endless batches of random clips for one rank from shards of raw videos; each DataLoader worker reads its
    own whole shards (see the module docstring)."""

    def __init__(self, shards: VideoShards, clip: ClipSpec, batch_size: int, seed: int, rank: int, world: int,
                 workers: int, augment: Augment, positions: list[list[int]], rotation: int):
        super().__init__()
        self.shards, self.clip, self.batch_size, self.seed = shards, clip, batch_size, seed
        self.rank, self.world, self.workers = rank, world, workers
        self.augment, self.positions, self.rotation = augment, positions, rotation

    @staticmethod
    def start(epoch: int) -> list[int]:
        """A worker's position at the start of ``epoch``: [epoch, index in the shuffled shards, sample ordinal
        in that shard, clips taken from that sample]."""
        return [epoch, 0, 0, 0]

    def _clips(self, sample: dict, epoch: int, folder: str) -> list[np.ndarray]:
        suffix, data = video_member(sample)
        path = f"{folder}/member{suffix}"
        with open(path, "wb") as file:
            file.write(data)
        try:
            video = decode_video(path, self.clip.fps, self.augment.decoded_side(self.clip.resolution))
        finally:
            Path(path).unlink()
        rng = np.random.default_rng([self.seed, epoch, member_id(sample["__shard__"], sample["__key__"])])
        return random_clips(video, self.clip.frames, self.clip.resolution, self.clip.per_video, self.augment, rng)

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.rotation) % self.workers
        share = worker_share(len(self.shards), self.seed, self.rank, self.world, worker, self.workers)
        epoch, index, ordinal_next, taken = self.positions[worker]
        batcher = ClipBatcher(self.batch_size)
        report = DataReport()
        with tempfile.TemporaryDirectory(prefix="nbp-clip-stream-") as folder:
            while True:
                order = np.random.default_rng([self.seed, epoch, 0x5A4D]).permutation(len(share))
                whole_pass, batcher.good = index == 0 and ordinal_next == 0, 0
                while index < len(order):
                    url = self.shards.urls[int(share[order[index]])]
                    reading = DataReport()  # this shard's: whether it was given up
                    sources = ((ordinal, member_name(url, sample["__key__"]),
                                functools.partial(self._clips, sample, epoch, folder))
                               for ordinal, sample in read_shard(url, ordinal_next, policy=self.shards.policy,
                                                                 report=reading))
                    for after in batcher.take_clips(sources, taken):  # (ordinal, taken) after the batch
                        clips, skipped = batcher.pop()
                        yield {"clips": clips, "worker": worker, "skipped": skipped,
                               "position": [epoch, index, *after], "report": report.take()}
                    if reading.counts["failed_shards"]:
                        batcher.skipped.append((url, "unreadable shard: retried, then skipped (failed_shards)"))
                    report.add(*reading.take())
                    index, ordinal_next, taken = index + 1, 0, 0
                if whole_pass and batcher.good == 0:
                    raise ListingError(f"none of the {len(share)} shard(s) of rank {self.rank}, loader worker "
                                       f"{worker} gave a clip ({self.clip.describe()}); reasons: "
                                       f"{sorted({reason for _, reason in batcher.skipped})[:5]}")
                epoch, index, ordinal_next, taken = epoch + 1, 0, 0, 0


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers share the CPUs with the training step


class ClipLoader:
    """Batches of uint8 clips [B, frames, R, R, 3] for one rank, with the state that resumes them exactly
    (:meth:`state_dict`, :meth:`load_state_dict` before the first batch)."""

    def __init__(self, videos: list[str] | VideoShards, clip: ClipSpec, batch_size: int, seed: int, rank: int,
                 world: int, workers: int, augment: Augment = Augment(), cache_bytes: int = 0, prefetch: int = 2,
                 pin_memory: bool = False):
        """``videos``: video files, or shards of raw videos (``cache_bytes`` applies to files only)."""
        self.world = world
        self.slots = max(1, workers)
        self.skipped: dict[str, str] = {}
        self.report = DataReport()  # shards read, retried and given up (a stream of shards)
        if isinstance(videos, VideoShards):
            if len(videos) < world * self.slots:
                raise ListingError(
                    f"{len(videos)} shard(s) cannot feed {world} rank(s) x {self.slots} loader worker(s): each "
                    f"worker reads whole shards; " + (f"set data.workers to at most {len(videos) // world}"
                                                      if len(videos) >= world else "use fewer ranks")
                    + " or write the videos into more, smaller shards")
            self.dataset = ShardClipStream(videos, clip, batch_size, seed, rank, world, self.slots, augment,
                                           [ShardClipStream.start(0) for _ in range(self.slots)], rotation=0)
        else:
            self.dataset = VideoClipStream([str(v) for v in videos], clip, batch_size, seed, rank, world,
                                           self.slots, augment, cache_bytes,
                                           [VideoClipStream.start(0) for _ in range(self.slots)], rotation=0)
        self.loader = DataLoader(self.dataset, batch_size=None, num_workers=workers, worker_init_fn=_one_thread,
                                 prefetch_factor=prefetch if workers else None, pin_memory=pin_memory,
                                 multiprocessing_context=loader_worker_context() if workers else None)
        self.batches = 0
        self._iterator = None

    @property
    def positions(self) -> list[list[int]]:
        return self.dataset.positions

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where :meth:`state_dict` was taken: exactly with the same number of ranks and workers, else
        from the start of the furthest epoch any worker had reached."""
        if self._iterator is not None:
            raise RuntimeError("a clip stream's state is loaded before its first batch")
        width = len(self.dataset.start(0))
        if any(len(p) != width for p in state["positions"]):
            raise ListingError(f"the clip stream was saved reading {'video files' if width == 4 else 'shards'}, "
                               f"this run reads {'shards' if width == 4 else 'video files'} (data.videos): use "
                               f"another run folder")
        if (state["workers"], state["world"]) == (self.slots, self.world):
            self.batches, positions = state["batches"], [list(p) for p in state["positions"]]
        else:
            epoch = max(p[0] for p in state["positions"])
            log.warning("the clip stream was saved with %d rank(s) x %d worker(s), this run has %d x %d: it "
                        "starts epoch %d from its beginning", state["world"], state["workers"], self.world,
                        self.slots, epoch)
            self.batches, positions = 0, [self.dataset.start(epoch) for _ in range(self.slots)]
        self.dataset.positions[:] = positions
        self.dataset.rotation = self.batches % self.slots

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self._iterator is None:
            self._iterator = start_workers(self.loader)
        item = next(self._iterator)
        self.positions[int(item["worker"])] = [int(v) for v in item["position"]]
        self.batches += 1
        if "report" in item:
            self.report.add(*item["report"])
        for path, reason in item["skipped"]:
            if path not in self.skipped:
                self.skipped[path] = reason
                log.warning("skipped %s: %s", path, reason)
        return item["clips"]

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "workers": self.slots, "world": self.world,
                "positions": [list(p) for p in self.positions]}

    def worker_pids(self) -> list[int]:
        """The process ids of the loader's running workers (none before the first batch, after :meth:`close` or
        with no workers); they are not this process' children (see nbp_ds.data.workers)."""
        return [worker.pid for worker in getattr(self._iterator, "_workers", [])]

    def close(self) -> None:
        self._iterator = None  # the DataLoader's workers end with their iterator
