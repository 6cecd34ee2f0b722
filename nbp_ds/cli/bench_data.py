"""Data-path throughput: the shard loader (samples/s with 1 and 4 workers) and tokenization (clips/s).

    nbp-bench-data                        # loader on 5x16x16 shards + small-preset tokenization
    nbp-bench-data --samples 50000 --workers 1 4 8 --skip-tokenize

The loader must feed far more than a GPU consumes: a 700M model at 50% MFU on an H100 trains on roughly
100k tokens/s = 80 clips of 1280 tokens per second per GPU, about 640 per 8-GPU node; the target is
2,000 samples/s per node from local disk. Everything is made in a temporary folder: synthetic token
shards in the paper's shape, and test videos from ffmpeg's lavfi sources.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from nbp_ds.cli import command


def bench_loader(folder: Path, grid: tuple[int, int, int], samples: int, workers: int, batch: int) -> float:
    from nbp_ds.data import build_loader

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


def bench_tokenize(tmp: Path, preset: str, videos: int, frames: int, resolution: int, workers: int) -> tuple:
    from nbp_ds.tokenizer.pipeline import TokenizeOptions, tokenize_dataset
    from nbp_ds.tokenizer.video_io import ClipSpec

    src = tmp / "videos"
    src.mkdir()
    for i in range(videos):
        subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=size=160x120:rate=8",
                        "-t", str(frames / 8 + 0.5), str(src / f"v{i:03d}.mp4")], check=True)
    opts = TokenizeOptions(videos=str(src), out=str(tmp / "tok"), tokenizer=f"random:{preset}",
                           clip=ClipSpec(frames, resolution, 8.0), workers=workers, batch_size=8, progress=False)
    summary = tokenize_dataset(opts)
    return summary.clips, summary.seconds


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="5,16,16", help="token grid T,H,W of the shards (default the paper's)")
    p.add_argument("--samples", type=int, default=20000, help="samples to read per loader measurement")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 4], help="loader worker counts to try")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--preset", default="small", help="tokenizer preset for the tokenization figure")
    p.add_argument("--videos", type=int, default=16, help="test videos to tokenize")
    p.add_argument("--skip-tokenize", action="store_true")
    args = p.parse_intermixed_args(argv)
    import numpy as np

    from nbp_ds.data import TokenShardWriter

    grid = tuple(int(x) for x in args.grid.split(","))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        rng = np.random.default_rng(0)
        n = min(args.samples, 10000)  # the train stream loops over them
        with TokenShardWriter(tmp / "shards", maxcount=500) as writer:
            for i in range(n):
                writer.write(f"s{i:07d}", rng.integers(0, 64000, grid), int(i % 101), {"source": f"v{i}"})
        size = sum(f.stat().st_size for f in (tmp / "shards").glob("*.tar")) / n
        print(f"loader: {n} samples of {grid} in {len(list((tmp / 'shards').glob('*.tar')))} shards "
              f"({size / 1024:.1f} KiB each), batch {args.batch_size}, {os.cpu_count()} cores")
        for w in args.workers:
            rate = bench_loader(tmp / "shards", grid, args.samples, w, args.batch_size)
            print(f"  {w} worker(s): {rate:,.0f} samples/s ({rate * np.prod(grid):,.0f} tokens/s)")
        if not args.skip_tokenize:
            frames, resolution = 17, 128
            clips, seconds = bench_tokenize(tmp, args.preset, args.videos, frames, resolution,
                                            workers=min(4, os.cpu_count() or 1))
            print(f"tokenize: {clips} clips of {frames}x{resolution}x{resolution} with random:{args.preset} on CPU "
                  f"in {seconds:.1f} s: {clips / seconds:.2f} clips/s (decode + encode + write)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
