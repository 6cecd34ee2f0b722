"""Tokenize a video dataset into WebDataset token shards (one sample per clip).

    nbp-tokenize --videos UCF-101/ --out shards/ucf101 --tokenizer runs/tok \\
        --frames 17 --resolution 128 --fps 8 --clips-per-video 2 --workers 8 --device cuda
    nbp-tokenize --videos list.csv --out shards/x --tokenizer random:tiny --frames 9 --resolution 32
    nbp-tokenize --videos K600/ --out shards/mixed --tokenizer runs/tok --frames 17,33 --resolution 128,128x224

--videos is a folder (class sub-folders become labels, as in UCF-101), a CSV `path,label`, or a text
file with one path per line (unlabelled). Labels map to ids in OUT/classes.json (sorted names, or the
mapping of --classes / a classes.json inside the --videos folder, so train and val agree).

Each video gives up to --clips-per-video clips of --frames frames at --fps, short side scaled to
--resolution and center-cropped. With several lengths (--frames 17,33) it gives that many clips of every length
that fits; with several sizes (--resolution 128,128x224: a square side or HEIGHTxWIDTH) each video is scaled to
cover the size whose aspect ratio is nearest its own and center-cropped to it. Each sample's tokens.npy has its
own grid: such shards are for packed training (data.pack_tokens; nbp-inspect-shards --mixed).
Videos that cannot be used (unreadable, too short) are skipped and listed with the reason in
OUT/failures.jsonl (failures-tNNN.jsonl for array tasks), and so are the files of the folder that are not
videos (reason not_a_video), so that every file is accounted for.

Decoding runs in --workers processes, one video each at a time. A video whose worker dies (a decoder crash,
the kernel's out-of-memory killer) is listed with reason worker_died, one still decoding after --video-timeout
seconds (a decoder stuck, a file whose reads never return on a hung network file system) with reason timeout;
the worker (and its ffmpeg) is stopped, a fresh one takes its place, the other videos go on unharmed.

Under a Slurm array job (see slurm/tokenize.sbatch) the number of shards comes from $NBP_NUM_SHARDS, else from
the split OUT/split.json recorded when the first task ran, else from the array's bounds; array task id i writes
only shard-tIII-*.tar, III = i modulo the number of shards (0- and 1-based arrays both cover every share once).
So a failed task can be rerun alone (`sbatch --array=7 ...`). Interrupted? Run the same command again: finished
shards are kept, unfinished ones redone; no clip is lost or duplicated.
Check the result with `nbp-inspect-shards OUT`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from nbp_ds.cli import command, setup_logging
from nbp_ds.errors import UsageError
from nbp_ds.tokenizer.array_split import resolve_split
from nbp_ds.tokenizer.pipeline import DEFAULT_VIDEO_TIMEOUT_S, TokenizeOptions, tokenize_dataset
from nbp_ds.video_io import add_clip_arguments, clip_from_arguments

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", required=True, help="folder of videos (class sub-folders), CSV path,label, or list")
    p.add_argument("--out", required=True, help="output folder for shard-*.tar, classes.json, failures.jsonl")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer folder (nbp-train-tokenizer), official:PATH (a released magvit2_*.pt) "
                        "or random:<preset>")
    add_clip_arguments(p, several=True)
    p.add_argument("--shard-size", type=int, default=1000, help="about this many clips per shard (default 1000)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="video decoding processes (default min(8, cores)); 0 decodes in this process, for "
                        "debugging: no --video-timeout, and a decoder crash ends the run")
    p.add_argument("--video-timeout", type=float, default=DEFAULT_VIDEO_TIMEOUT_S, metavar="SECONDS",
                   help="a video still decoding after this long is stopped and listed with reason timeout "
                        f"(default {DEFAULT_VIDEO_TIMEOUT_S:g}; raise it for hour-long videos)")
    p.add_argument("--batch-size", type=int, default=16, help="clips per tokenizer forward pass (default 16)")
    p.add_argument("--device", default="cpu", help="tokenizer device: cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--classes", help="classes.json fixing label ids (default: sorted class names)")
    p.add_argument("--num-shards", type=int,
                   help="number of tasks splitting the dataset (default $NBP_NUM_SHARDS, else OUT/split.json, "
                        "else the Slurm array's bounds, else 1)")
    p.add_argument("--shard-index", type=int,
                   help="this task's share, 0..num-shards-1 (default $SLURM_ARRAY_TASK_ID modulo the number of "
                        "shards, else 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (batch logs)")
    return p.parse_args(argv)


@command
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    clip = clip_from_arguments(args)
    for name in ("shard_size", "batch_size", "num_shards"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if not args.video_timeout > 0:
        raise UsageError(f"--video-timeout must be > 0 seconds, got {args.video_timeout}")
    split = resolve_split(args.out, os.environ, args.num_shards, args.shard_index)
    log.info("shard index %d of %d (the number of shards from %s)", split.index, split.count, split.source)
    opts = TokenizeOptions(
        videos=args.videos, out=args.out, tokenizer=args.tokenizer, clip=clip, shard_size=args.shard_size,
        workers=args.workers, video_timeout=args.video_timeout,
        batch_size=args.batch_size, device=args.device, num_shards=split.count, shard_index=split.index,
        classes=args.classes, progress=not args.no_progress)
    summary = tokenize_dataset(opts)
    print(summary.line())
    if summary.failures or summary.not_videos:
        print(f"{len(summary.failures)} video(s) skipped and {len(summary.not_videos)} other file(s) not taken, "
              f"each named with the reason in {args.out}/failures*.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
