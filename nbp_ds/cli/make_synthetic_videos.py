"""Make the quickstart's labelled synthetic videos: one shape moving in one direction per mp4.

    nbp-make-synthetic-videos --out data/shapes --per-class 150 --val-per-class 4
    nbp-make-synthetic-videos --out data/shapes --per-class 20 --frames 17 --size 64 --workers 4

12 classes = 3 shapes (square, circle, triangle) x 4 directions (right, left, down, up); the world is defined
in nbp_ds/eval/synthetic.py. Layout of --out:

    OUT/classes.json                        {class name: class id}, also copied to OUT/train and OUT/val
    OUT/world.json                          the parameters below (a rerun with other ones is refused)
    OUT/train/<class>/<class>_<i:04d>.mp4   --per-class videos per class
    OUT/val/<class>/<class>_<i:04d>.mp4     --val-per-class videos per class (different random draws)

Every video is exactly --frames frames at --fps (H.264, yuv420p, crf 18), so decoding it at --fps gives back
exactly one clip of --frames frames (nbp_ds.video_io.read_clips). Checked: ffmpeg's fps filter neither
drops nor duplicates the last frame of such a file, so no padding frames are needed. Each video is drawn from its
own seed, derived from (--seed, split, class, index): the output does not depend on --workers or on which videos
already existed. Re-running resumes: existing non-empty files are kept; every file is written under a temporary
name and renamed into place, so an interrupted run never leaves a truncated mp4 behind.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from nbp_ds.cli import command, setup_logging
from nbp_ds.cli.options import add_object_size_argument
from nbp_ds.errors import UsageError
from nbp_ds.eval.synthetic import CLASSES
from nbp_ds.eval.synthetic_dataset import write_dataset


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created; existing videos in it are kept)")
    p.add_argument("--per-class", type=int, required=True, help="training videos per class")
    p.add_argument("--val-per-class", type=int, default=0, help="held-out videos per class (default 0)")
    p.add_argument("--frames", type=int, default=9, help="frames per video (default 9)")
    p.add_argument("--size", type=int, default=32, help="frame width and height in pixels (default 32)")
    p.add_argument("--fps", type=float, default=8.0, help="frame rate written into the mp4 (default 8)")
    add_object_size_argument(p)
    p.add_argument("--seed", type=int, default=0, help="base seed; each video's seed derives from it (default 0)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="parallel processes rendering and encoding (default: all CPU cores)")
    args = p.parse_args(argv)
    for name in ("per_class", "val_per_class"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.frames < 1:
        p.error("--frames must be >= 1")
    if args.size < 8:
        p.error("--size must be >= 8")
    if args.fps <= 0:
        p.error("--fps must be > 0")
    if args.workers < 1:
        p.error("--workers must be >= 1")
    return args


@command
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    out = Path(args.out).resolve()
    began = time.perf_counter()
    try:
        made, kept = write_dataset(out, args.per_class, args.val_per_class, args.frames, args.size, args.fps,
                                   args.seed, args.workers, args.object_size)
    except ValueError as exc:  # the folder holds another world's videos
        raise UsageError(str(exc)) from None
    seconds = time.perf_counter() - began
    rate = made / seconds if made and seconds > 0 else 0.0
    print(f"made {made} videos ({kept} existing kept) in {seconds:.1f} s ({rate:.1f} videos/s): "
          f"{args.per_class} train + {args.val_per_class} val per class x {len(CLASSES)} classes, "
          f"{args.frames} frames {args.size}x{args.size} at {args.fps:g} fps -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
