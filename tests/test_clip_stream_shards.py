"""The tokenizer trainer's clip stream read from WebDataset shards of raw videos: real tars (webdataset's
writer) holding real ffmpeg-made mp4s, read locally, through ``pipe:`` and from a real HTTP server on loopback."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from shard_server import ShardServer
from video_fixtures import dataset

from nbp_ds.data.shards import RetryPolicy
from nbp_ds.tokenizer.clip_stream import Augment, ClipLoader, random_clips
from nbp_ds.tokenizer.dataset_listing import ListingError
from nbp_ds.tokenizer.video_shards import VideoShards, expand_video_shards, names_shards
from nbp_ds.video_io import ClipSpec, decode_video

CLIP = ClipSpec(9, 32, 8.0, 1)
AUGMENT = Augment(random_crop=0.25, flip=True)
FAST = RetryPolicy(retries=1, backoff=0.01)


def write_shard(path: Path, videos: list[Path]) -> Path:
    """A tar of samples KEY.mp4 + KEY.cls, keys from the file names (class folder + stem)."""
    with wds.TarWriter(str(path)) as sink:
        for video in videos:
            sink.write({"__key__": f"{video.parent.name}_{video.stem}", "mp4": video.read_bytes(),
                        "cls": video.parent.name[-1].encode()})
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shards: three good videos each, the broken file in the first and the too-short video in the second."""
    root = dataset(tmp_path_factory.mktemp("vshards") / "videos", classes=2, per_class=3)
    folder = root.parent / "shards"
    folder.mkdir()
    first = sorted((root / "class0").glob("*.mp4"))  # broken.mp4, v00..v02
    second = sorted((root / "class1").glob("*.mp4"))  # short.mp4, v00..v02
    return [str(write_shard(folder / "shard-000000.tar", first)), str(write_shard(folder / "shard-000001.tar", second))]


def expected_clip(video: Path, url: str, key: str, seed: int, epoch: int) -> np.ndarray:
    """The definition: the video file decoded, then random_clips with the rng of (seed, epoch, sha1(url#key))."""
    member = int.from_bytes(hashlib.sha1(f"{url}#{key}".encode()).digest()[:8], "little")
    video_frames = decode_video(video, CLIP.fps, AUGMENT.decoded_side(CLIP.resolution))
    return random_clips(video_frames, CLIP.frames, CLIP.resolution, 1, AUGMENT,
                        np.random.default_rng([seed, epoch, member]))[0]


def test_clips_from_shards_are_the_clips_of_the_same_videos_as_files(shards):
    local, piped = shards[0], f"pipe:cat {shards[1]}"  # one shard read from a file, one from a command
    loader = ClipLoader(VideoShards((local, piped)), CLIP, batch_size=1, seed=3, rank=0, world=1, workers=0,
                        augment=AUGMENT)
    got = [next(loader)[0].numpy() for _ in range(6)]  # one epoch: 6 good members, one clip each
    assert [p[:1] for p in loader.positions] == [[0]]
    loader.close()
    root = Path(shards[0]).parent.parent / "videos"
    expected = [expected_clip(root / c / f"v{i:02d}.mp4", url, f"{c}_v{i:02d}", seed=3, epoch=0)
                for c, url in (("class0", local), ("class1", piped)) for i in range(3)]
    as_bytes = sorted(clip.tobytes() for clip in got)
    assert as_bytes == sorted(clip.tobytes() for clip in expected)
    assert loader.skipped.keys() == {f"{local}#class0_broken", f"{piped}#class1_short"}


def test_a_resumed_shard_stream_continues_exactly(shards):
    # two clips per member, batches of three, two workers (one shard each): states fall in the middle of a member
    kwargs = dict(clip=ClipSpec(9, 32, 8.0, 2), batch_size=3, seed=0, rank=0, world=1, workers=2, augment=AUGMENT)
    straight = ClipLoader(VideoShards(tuple(shards)), **kwargs)
    batches = [next(straight).clone() for _ in range(8)]  # 6 x 2 = 12 clips an epoch: two epochs
    straight.close()
    first = ClipLoader(VideoShards(tuple(shards)), **kwargs)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint keeps
    first.close()
    assert state["batches"] == 3 and all(len(p) == 4 for p in state["positions"])
    assert any(p[2] > 0 and p[3] == 1 for p in state["positions"])  # inside a shard, inside a member
    resumed = ClipLoader(VideoShards(tuple(shards)), **kwargs)
    resumed.load_state_dict(state)
    for i, expected in enumerate(batches[3:], start=3):
        assert torch.equal(next(resumed), expected), f"batch {i} differs after the resume"
    resumed.close()


def test_a_corrupt_member_and_a_missing_http_shard_are_skipped_and_counted(shards):
    folder = Path(shards[0]).parent
    with ShardServer(folder) as server:
        good, missing = server.url("shard-000000.tar"), server.url("missing.tar")
        loader = ClipLoader(VideoShards((good, missing), FAST), CLIP, batch_size=1, seed=0, rank=0, world=1,
                            workers=0)
        clips = [next(loader) for _ in range(4)]  # three good members an epoch: the 404 shard was passed
        loader.close()
    assert all(c.shape == (1, 9, 32, 32, 3) for c in clips)
    assert loader.report.counts["failed_shards"] >= 1 and loader.report.counts["shard_retries"] >= 1
    assert server.requests["missing.tar"] >= 2  # tried, then retried
    assert loader.skipped[f"{good}#class0_broken"]
    assert "unreadable shard" in loader.skipped[missing]


def test_refusals_name_the_numbers_and_the_key(shards, tmp_path):
    with pytest.raises(ListingError, match=r"2 shard\(s\) cannot feed 1 rank\(s\) x 3 loader worker\(s\).*"
                                           r"data.workers to at most 2"):
        ClipLoader(VideoShards(tuple(shards)), CLIP, batch_size=1, seed=0, rank=0, world=1, workers=3)
    with pytest.raises(ListingError, match=r"2 shard\(s\) cannot feed 4 rank\(s\) x 1 .*fewer ranks"):
        ClipLoader(VideoShards(tuple(shards)), CLIP, batch_size=1, seed=0, rank=1, world=4, workers=0)
    from nbp_ds.errors import ConfigError
    from nbp_ds.tokenizer.config import load_tokenizer_config

    with pytest.raises(ConfigError, match="data.val_videos .* required when data.videos names shards"):
        load_tokenizer_config(None, [f"data.videos={Path(shards[0]).parent}", f"train.out_dir={tmp_path}"])


def test_what_names_shards(shards):
    folder = Path(shards[0]).parent
    for spec in (folder, f"{folder}/shard-{{000000..000001}}.tar", "pipe:cat x.tar", "http://h/s-{0..3}.tar"):
        assert names_shards(spec), spec
    videos = folder.parent / "videos"
    assert not names_shards(videos) and not names_shards(videos / "class0" / "v00.mp4")
    listing = folder.parent / "lists" / "shards.txt"  # relative lines: relative to the list file
    listing.parent.mkdir(exist_ok=True)
    listing.write_text("# two shards\n" + "\n".join(f"../{folder.name}/{Path(s).name}" for s in shards) + "\n")
    assert names_shards(listing)
    assert [Path(u).resolve() for u in expand_video_shards(listing).urls] == [Path(s).resolve() for s in shards]
