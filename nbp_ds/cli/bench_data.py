"""Data-path throughput: the shard loader (samples/s with 1 and 4 workers), the time a resumed loader takes
to deliver its first batch at 10k and 1M samples seen, and tokenization (clips/s).

    nbp-bench-data                        # loader on 5x16x16 shards, resume, small-preset tokenization
    nbp-bench-data --samples 50000 --workers 1 4 8 --skip-tokenize
    nbp-bench-data --resume-at 10000 100000 1000000 --skip-tokenize

The loader must feed far more than a GPU consumes: a 700M model at 50% MFU on an H100 trains on roughly
100k tokens/s = 80 clips of 1280 tokens per second per GPU, about 640 per 8-GPU node; the target is
2,000 samples/s per node from local disk. Resuming seeks to the saved position (nbp_ds.data.resume), so
its time should not grow with the samples seen; reading the stream again up to that point (what a resume
cost before loaders kept a state) is measured next to it at the first position. Reaching 1M samples seen
means reading them once (minutes on a laptop). Everything is made in a temporary folder: synthetic token
shards in the paper's shape, and test videos from ffmpeg's lavfi sources.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from nbp_ds.cli import command


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="5,16,16", help="token grid T,H,W of the shards (default the paper's)")
    p.add_argument("--samples", type=int, default=20000, help="samples to read per loader measurement")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 4], help="loader worker counts to try")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--preset", default="small", help="tokenizer preset for the tokenization figure")
    p.add_argument("--videos", type=int, default=16, help="test videos to tokenize")
    p.add_argument("--resume-at", type=int, nargs="*", default=[10_000, 1_000_000],
                   help="samples seen at which to measure a resume (default 10000 1000000; none: skip)")
    p.add_argument("--skip-tokenize", action="store_true")
    args = p.parse_intermixed_args(argv)
    import numpy as np  # local: --help answers before torch loads

    from nbp_ds.perf.data_bench import (  # local: --help answers before torch loads
        bench_loader,
        bench_resume,
        bench_tokenize,
        write_token_shards,
    )

    grid = tuple(int(x) for x in args.grid.split(","))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        n = min(args.samples, 10000)  # the train stream loops over them
        size = write_token_shards(tmp / "shards", grid, n)
        print(f"loader: {n} samples of {grid} in {len(list((tmp / 'shards').glob('*.tar')))} shards "
              f"({size / 1024:.1f} KiB each), batch {args.batch_size}, {os.cpu_count()} cores")
        for w in args.workers:
            rate = bench_loader(tmp / "shards", grid, args.samples, w, args.batch_size)
            print(f"  {w} worker(s): {rate:,.0f} samples/s ({rate * np.prod(grid):,.0f} tokens/s)")
        if args.resume_at:
            w = max(args.workers)
            print(f"resume: a new loader ({w} worker(s)) from a saved state to its first batch")
            for seen, reached, seek, replay in bench_resume(tmp / "shards", grid, args.resume_at, w, args.batch_size):
                line = f"  at {seen:>9,} samples seen: {seek:6.2f} s (reached in {reached:.0f} s)"
                if replay is not None:
                    line += f"; reading the stream again to there instead: {replay:.2f} s"
                print(line)
        if not args.skip_tokenize:
            frames, resolution = 17, 128
            clips, seconds = bench_tokenize(tmp, args.preset, args.videos, frames, resolution,
                                            workers=min(4, os.cpu_count() or 1))
            print(f"tokenize: {clips} clips of {frames}x{resolution}x{resolution} with random:{args.preset} on CPU "
                  f"in {seconds:.1f} s: {clips / seconds:.2f} clips/s (decode + encode + write)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
