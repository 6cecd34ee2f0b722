"""Peak memory and clips/s of the tokenizer trainer's clip stream for datasets of several sizes.

    nbp-bench-clip-stream                                  # 100 and 1,000 videos, 17x128x128 clips, 1 and 2 workers
    nbp-bench-clip-stream --videos 100 1000 10000 --workers 4 --cache-mb 0 64

Each figure comes from a fresh process that reads one whole epoch (every video once) through the stream the
trainer uses: the peak resident memory of the process and of its largest loader worker must not grow with
the number of videos (the per-worker cache of decoded videos is bounded by --cache-mb), and clips/s per
worker is the decoding rate one loader process sustains. The videos are links to a few distinct ffmpeg
lavfi test videos (64x48, 3-5 s) in a temporary folder, each link a video of its own to the stream.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from nbp_ds.cli import command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nbp-bench-clip-stream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, nargs="+", default=[100, 1000], help="dataset sizes (default 100 1000)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader workers (default 1 2)")
    p.add_argument("--cache-mb", type=int, nargs="+", default=[0, 64],
                   help="decoded-video cache per worker in MB (default 0 64; 64 is data.cache_mb's default)")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # one measurement, in this process
    return p


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nbp_ds.video_io import ClipSpec  # local: --help answers before torch loads

    clip = ClipSpec(args.frames, args.resolution, 8.0, 1)
    if args.measure is not None:
        from nbp_ds.perf.clip_stream import measure  # local: --help answers before torch loads

        print(json.dumps(measure(args.measure, args.workers[0], clip, args.batch_size, args.cache_mb[0])))
        return 0
    from nbp_ds.perf.clip_stream import make_dataset  # local: --help answers before torch loads

    print(f"clip stream: {clip.describe()}, batches of {args.batch_size}, one epoch per figure")
    print(f"{'videos':>7} {'workers':>7} {'cache MB':>8} {'clips/s':>8} {'/worker':>8} {'main RSS MB':>11} "
          f"{'worker RSS MB':>13}")
    with tempfile.TemporaryDirectory(prefix="nbp-bench-clips-") as tmp:
        for count in args.videos:
            folder = make_dataset(Path(tmp) / f"videos{count}", count)
            for workers in args.workers:
                for cache in args.cache_mb:
                    cmd = [sys.executable, "-m", "nbp_ds.cli.bench_clip_stream", "--measure", str(folder),
                           "--workers", str(workers), "--cache-mb", str(cache), "--frames", str(args.frames),
                           "--resolution", str(args.resolution), "--batch-size", str(args.batch_size)]
                    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
                    r = json.loads(result.stdout.strip().splitlines()[-1])
                    print(f"{r['videos']:>7} {workers:>7} {cache:>8} {r['clips_per_s']:>8.1f} "
                          f"{r['clips_per_s_per_worker']:>8.1f} {r['peak_rss_mb']:>11.0f} "
                          f"{r['worker_peak_rss_mb']:>13.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
