#!/usr/bin/env python
"""Make the quickstart's labelled synthetic videos: one shape moving in one direction per mp4.

    python tools/make_synthetic_videos.py --out data/shapes --per-class 150 --val-per-class 4
    python tools/make_synthetic_videos.py --out data/shapes --per-class 20 --frames 17 --size 64 --workers 4

12 classes = 3 shapes (square, circle, triangle) x 4 directions (right, left, down, up); the world is defined
in nbp_ds/eval/synthetic.py. Layout of --out:

    OUT/classes.json                        {class name: class id}, also copied to OUT/train and OUT/val
    OUT/train/<class>/<class>_<i:04d>.mp4   --per-class videos per class
    OUT/val/<class>/<class>_<i:04d>.mp4     --val-per-class videos per class (different random draws)

Every video is exactly --frames frames at --fps (H.264, yuv420p, crf 18), so decoding it at --fps gives back
exactly one clip of --frames frames (nbp_ds.tokenizer.video_io.read_clips). Checked: ffmpeg's fps filter neither
drops nor duplicates the last frame of such a file, so no padding frames are needed. Each video is drawn from its
own seed, derived from (--seed, split, class, index): the output does not depend on --workers or on which videos
already existed. Re-running resumes: existing non-empty files are kept; files are written under OUT/.tmp and renamed
into place, so an interrupted run never leaves a truncated mp4 behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a plain script from anywhere, without installing the package
    sys.path.insert(0, str(ROOT))

from nbp_ds.eval.synthetic import CLASSES, parse_class, render_clip  # noqa: E402

log = logging.getLogger("make_synthetic_videos")
SPLITS = ("train", "val")
TMP_DIR = ".tmp"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created; existing videos in it are kept)")
    p.add_argument("--per-class", type=int, required=True, help="training videos per class")
    p.add_argument("--val-per-class", type=int, default=0, help="held-out videos per class (default 0)")
    p.add_argument("--frames", type=int, default=9, help="frames per video (default 9)")
    p.add_argument("--size", type=int, default=32, help="frame width and height in pixels (default 32)")
    p.add_argument("--fps", type=float, default=8.0, help="frame rate written into the mp4 (default 8)")
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


def video_path(out: Path, split: str, name: str, index: int) -> Path:
    """Where video `index` of class `name` in `split` goes."""
    return out / split / name / f"{name}_{index:04d}.mp4"


def video_rng(seed: int, split: str, class_index: int, index: int) -> np.random.Generator:
    """The generator of one video: independent streams per (seed, split, class, index), so train and val differ."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), class_index, index]))


def make_one(job: tuple[str, str, str, int, int, int, float, int]) -> str:
    """Render and encode one video (runs in a worker process). Returns its path."""
    from nbp_ds.tokenizer.video_io import write_video

    out, split, name, index, frames, size, fps, seed = job
    final = video_path(Path(out), split, name, index)
    shape, direction = parse_class(name)
    clip = render_clip(shape, direction, frames, size, video_rng(seed, split, CLASSES.index(name), index))
    # ffmpeg picks the container from the suffix, so the temporary file keeps ".mp4"; it lives outside train/ and
    # val/ so that nothing globbing "*.mp4" there can pick up a half-written file.
    tmp = Path(out) / TMP_DIR / f"{split}-{name}-{index:04d}.{os.getpid()}.mp4"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_video(clip, tmp, fps=fps)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return str(final)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write `data` as JSON through a temporary file and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    out = Path(args.out).resolve()
    began = time.perf_counter()

    # Leftovers of an interrupted run (one generator per --out at a time): never renamed into place, so unused.
    tmp_dir = out / TMP_DIR
    if tmp_dir.is_dir():
        for stale in tmp_dir.glob("*.mp4"):
            stale.unlink(missing_ok=True)

    classes = {name: i for i, name in enumerate(CLASSES)}
    for folder in (out, out / "train", out / "val"):
        write_json_atomic(folder / "classes.json", classes)

    counts = {"train": args.per_class, "val": args.val_per_class}
    jobs, skipped = [], 0
    for split in SPLITS:
        for name in CLASSES:
            for index in range(counts[split]):
                path = video_path(out, split, name, index)
                if path.is_file() and path.stat().st_size > 0:
                    skipped += 1  # resume: a finished video from an earlier run
                    continue
                jobs.append((str(out), split, name, index, args.frames, args.size, args.fps, args.seed))
    log.info("%d videos to make, %d already there, in %s (%d classes, %d frames of %dx%d at %g fps, %d workers)",
             len(jobs), skipped, out, len(CLASSES), args.frames, args.size, args.size, args.fps, args.workers)

    made_began = time.perf_counter()
    workers = min(args.workers, max(1, len(jobs)))
    if workers == 1:
        with tqdm(total=len(jobs), unit="video", desc="videos", dynamic_ncols=True, disable=not jobs) as bar:
            for job in jobs:
                make_one(job)
                bar.update()
    else:
        # Each video costs one ffmpeg process start (~50 ms) plus a few ms of numpy: the work is dominated by
        # process start-up, which parallelises across cores. Fork (where there is one) rather than spawn: the
        # nbp_ds packages import torch (~1 s per spawned worker); forking reuses the parent's imports. The pool
        # is forked before tqdm starts its monitor thread. Small chunks keep the progress bar moving.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(workers) as pool, \
                tqdm(total=len(jobs), unit="video", desc="videos", dynamic_ncols=True) as bar:
            for _ in pool.imap_unordered(make_one, jobs, chunksize=4):
                bar.update()
    made_seconds = time.perf_counter() - made_began
    if tmp_dir.is_dir() and not any(tmp_dir.iterdir()):
        tmp_dir.rmdir()

    rate = len(jobs) / made_seconds if jobs and made_seconds > 0 else 0.0
    print(f"made {len(jobs)} videos ({skipped} existing kept) in {time.perf_counter() - began:.1f} s "
          f"({rate:.1f} videos/s): {counts['train']} train + {counts['val']} val per class x {len(CLASSES)} classes, "
          f"{args.frames} frames {args.size}x{args.size} at {args.fps:g} fps -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
