"""Data-path throughput, for ``nbp-bench-data``: the shard loader's samples/s, the time a resumed loader takes to
deliver its first batch (and, next to it, reading the stream again up to there), and tokenization's clips/s.
Wall clock throughout (the data path runs on the host)."""

from __future__ import annotations

import json
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np

from nbp_ds import ffmpeg_tools
from nbp_ds.data import TokenShardWriter, build_loader
from nbp_ds.tokenizer.pipeline import TokenizeOptions, tokenize_dataset
from nbp_ds.video_io import ClipSpec


def write_token_shards(folder: Path, grid: tuple[int, int, int], samples: int) -> float:
    """``samples`` random clips of ``grid`` tokens (64,000 codes, 101 classes) as 500-sample shards in ``folder``;
    returns the bytes per sample on disk."""
    rng = np.random.default_rng(0)
    with TokenShardWriter(folder, maxcount=500) as writer:
        for i in range(samples):
            writer.write(f"s{i:07d}", rng.integers(0, 64000, grid), int(i % 101), {"source": f"v{i}"})
    return sum(f.stat().st_size for f in folder.glob("*.tar")) / samples


def bench_loader(folder: Path, grid: tuple[int, int, int], samples: int, workers: int, batch: int) -> float:
    """Samples per second a training loader delivers once its workers are up."""
    # more workers than cores is what this measures (a node has many more): not a mistake to warn about
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    loader = build_loader(folder, grid=grid, batch_size=batch, mode="train", num_workers=workers, seed=0,
                          shuffle_buffer=1000)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    began, seen = time.perf_counter(), 0
    while seen < samples:
        seen += next(it)["tokens"].shape[0]
    return seen / (time.perf_counter() - began)


def bench_resume(folder: Path, grid: tuple[int, int, int], seen: list[int], workers: int, batch: int,
                 replay_first: bool = True) -> list[tuple[int, float, float, float | None]]:
    """For each number of samples seen: (samples, seconds to reach it, seconds from a saved state to the
    first batch of a new loader, seconds for the same by reading the stream again up to there)."""
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    kwargs = dict(grid=grid, batch_size=batch, mode="train", num_workers=workers, seed=0, shuffle_buffer=1000)
    loader = build_loader(folder, **kwargs)
    it, done, results = iter(loader), 0, []
    began = time.perf_counter()
    for target in sorted(seen):
        while done * batch < target:
            next(it)
            done += 1
        reached = time.perf_counter() - began
        state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint keeps it
        start = time.perf_counter()
        resumed = build_loader(folder, **kwargs)
        resumed.load_state_dict(state)
        next(iter(resumed))
        seek = time.perf_counter() - start
        replay = None
        if replay_first and not results:
            start = time.perf_counter()
            next(iter(build_loader(folder, start_batch=done, **kwargs)))
            replay = time.perf_counter() - start
        results.append((done * batch, reached, seek, replay))
        began = time.perf_counter() - reached  # the resume measurements do not count as reaching
    return results


def bench_tokenize(tmp: Path, preset: str, videos: int, frames: int, resolution: int, workers: int) -> tuple:
    """(clips, seconds) of tokenizing ``videos`` ffmpeg test videos made in ``tmp`` with ``random:<preset>``."""
    src = tmp / "videos"
    src.mkdir()
    for i in range(videos):
        subprocess.run([ffmpeg_tools.ffmpeg(), "-loglevel", "error", "-f", "lavfi",
                        "-i", "testsrc2=size=160x120:rate=8", "-t", str(frames / 8 + 0.5),
                        str(src / f"v{i:03d}.mp4")], check=True)
    opts = TokenizeOptions(videos=str(src), out=str(tmp / "tok"), tokenizer=f"random:{preset}",
                           clip=ClipSpec(frames, resolution, 8.0), workers=workers, batch_size=8, progress=False)
    summary = tokenize_dataset(opts)
    return summary.clips, summary.seconds
