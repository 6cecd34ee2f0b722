"""The tokenizer trainer's clip stream: real videos decoded by ffmpeg in DataLoader workers, split over ranks and
workers, fresh random clips every epoch, bad videos skipped and listed, and an exact resume from its state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from video_fixtures import dataset, lavfi_video

from nbp_ds.tokenizer.clip_stream import Augment, ClipBatcher, ClipLoader, random_clips, worker_share
from nbp_ds.video_io import ClipSpec, ClipTooShort, VideoError, decode_video, find_videos


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = dataset(tmp_path_factory.mktemp("stream") / "videos", classes=2, per_class=3)
    return [str(p) for p in find_videos(root)]


@pytest.mark.parametrize("first_cursor, names", [(0, "video{}.mp4"), (5, "shard-000.tar#sample{}")],
                         ids=["files", "shards"])
def test_take_clips_resumes_exactly_from_every_position_it_gives(first_cursor, names):
    """The one loop both streams fill batches with (video files: cursors are indices in the shuffled share; a
    shard's samples: cursors are ordinals, from where the shard was entered). Sources give 1 to 3 clips, some
    none (skipped); a clip is the number cursor * 10 + j. Expected by hand: every good source's clips in order,
    cut into batches of 4 (the last, short one not given); from each position given, a new batcher over the
    sources from that cursor gives exactly the rest."""
    counts = [3, 0, 2, 1, 3, 3, 0, 2, 1, 2, 3]  # 0: the source fails to decode
    cursors = range(first_cursor, first_cursor + len(counts))

    def sources(start: int):
        def decode(cursor: int):
            count = counts[cursor - first_cursor]
            if count == 0:
                raise (VideoError if cursor % 2 else ClipTooShort)(names.format(cursor), "no clip")
            return [np.array(cursor * 10 + j) for j in range(count)]
        return ((c, names.format(c), lambda c=c: decode(c)) for c in cursors if c >= start)

    clips = [c * 10 + j for c in cursors for j in range(counts[c - first_cursor])]
    expected = [clips[i:i + 4] for i in range(0, len(clips) - 3, 4)]
    batcher = ClipBatcher(4)
    batches, positions = [], []
    for position in batcher.take_clips(sources(first_cursor), 0):
        batch, _ = batcher.pop()
        batches.append(batch.tolist())
        positions.append(position)
    assert batches == expected
    assert batcher.good == sum(1 for n in counts if n)
    for i, (cursor, taken) in enumerate(positions):
        resumed = ClipBatcher(4)
        rest = [resumed.pop()[0].tolist() for _ in resumed.take_clips(sources(cursor), taken)]
        assert rest == expected[i + 1:], f"resumed at {cursor, taken}"


def test_every_video_goes_to_exactly_one_rank_and_worker():
    shares = [worker_share(23, seed=4, rank=r, world=2, worker=w, workers=3) for r in range(2) for w in range(3)]
    seen = np.concatenate(shares)
    assert sorted(seen.tolist()) == list(range(23))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_resumed_stream_continues_exactly(videos):
    # two clips per video and batches of three: saved states fall in the middle of a video; 3 batches saved
    # with 2 workers: the resumed loader's worker cycle must be turned by one
    kwargs = dict(clip=ClipSpec(9, 32, 8.0, 2), batch_size=3, seed=0, rank=0, world=1, workers=2,
                  augment=Augment(random_crop=0.25, flip=True), cache_bytes=1 << 24)
    straight = ClipLoader(videos, **kwargs)
    batches = [next(straight).clone() for _ in range(8)]  # 6 good videos x 2 clips = 12 a epoch: two epochs
    straight.close()
    assert all(b.shape == (3, 9, 32, 32, 3) and b.dtype == torch.uint8 for b in batches)
    assert {p.rsplit("/", 1)[1] for p in straight.skipped} == {"broken.mp4", "short.mp4"}
    first = ClipLoader(videos, **kwargs)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint keeps
    first.close()
    assert state["batches"] == 3 and state["positions"][0][2] in (0, 1)
    resumed = ClipLoader(videos, **kwargs)
    resumed.load_state_dict(state)
    for i, expected in enumerate(batches[3:], start=3):
        assert torch.equal(next(resumed), expected), f"batch {i} differs after the resume"
    resumed.close()


def test_each_epoch_draws_fresh_random_clips(videos):
    # the moving ones (testsrc, testsrc2, mandelbrot): a clip's frames tell its start time
    good = [v for v in videos if v.endswith(("class0/v00.mp4", "class0/v01.mp4", "class1/v01.mp4"))]
    loader = ClipLoader(good, ClipSpec(9, 32, 8.0, 1), batch_size=1, seed=0, rank=0, world=1, workers=0)
    epoch0 = [next(loader)[0] for _ in good]
    epoch1 = [next(loader)[0] for _ in good]
    assert {int(p[0]) for p in loader.positions} == {1}  # two epochs read, one video a batch
    key = {clip.numpy().tobytes() for clip in epoch0}
    assert len(key) == len(good) == 3 and sum(c.numpy().tobytes() in key for c in epoch1) < len(good)


def test_random_clips_are_windows_of_the_video(tmp_path):
    video = decode_video(lavfi_video(tmp_path / "v.mp4", size="64x48", seconds=2.0), 8.0, 40)
    rng = np.random.default_rng(0)
    clips = random_clips(video, 5, 32, 20, Augment(0.25, True), rng)
    flipped = 0
    for clip in clips:
        windows = [(s, y, x, f) for s in range(len(video) - 4) for y in range(9) for x in range(9) for f in (0, 1)
                   if np.array_equal(clip, (video[s:s + 5, y:y + 32, x:x + 32])[:, :, ::-1 if f else 1])]
        assert windows, "a clip that is no window of the video"
        flipped += all(f for *_, f in windows)
    assert 0 < flipped < 20  # about half flipped
    with pytest.raises(ClipTooShort):
        random_clips(video[:4], 5, 32, 1, Augment(), rng)


def test_a_workers_cache_holds_at_most_its_bytes_and_a_small_dataset_is_decoded_once():
    """data.cache_mb: a worker keeps at most that many bytes of decoded videos, least recently used out first;
    a dataset that fits is decoded once whatever the number of epochs."""
    from nbp_ds.tokenizer.clip_stream import DecodedVideos

    decoded: list[str] = []

    def decode(path: str) -> np.ndarray:  # a "video" of 100 bytes
        decoded.append(path)
        return np.zeros(100, np.uint8)

    cache = DecodedVideos(250)  # room for two
    for path in ["a", "b", "a", "c", "b", "a"]:  # by hand: a b (a hit) c evicts b; b evicts a; a evicts c
        assert cache.get(path, decode).nbytes == 100
        assert cache.size <= 250 and sum(v.nbytes for v in cache.videos.values()) == cache.size
    assert decoded == ["a", "b", "c", "b", "a"] and list(cache.videos) == ["b", "a"]
    decoded.clear()
    small = DecodedVideos(1000)
    for _ in range(3):  # three epochs of a dataset that fits
        for path in ["a", "b", "c"]:
            small.get(path, decode)
    assert decoded == ["a", "b", "c"]
    assert DecodedVideos(0).get("a", decode) is not None and decoded == ["a", "b", "c", "a"]  # 0: no cache
