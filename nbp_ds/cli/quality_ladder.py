"""The quality ladder of the synthetic world: the checker's shape, direction and colour readings on held-out
source clips (its ceiling), on the tokenizer's reconstructions of them (with PSNR, SSIM and per-channel colour
error) and on sampled videos, each with its count and 95% Wilson interval.

    nbp-quality-ladder --videos data/shapes/val --tokenizer runs/tok/tokenizer --samples samples/ \\
        --json quality.json --tensorboard quality/

--videos is a folder of class subfolders (<class>/*.mp4, as nbp-make-synthetic-videos writes), decoded to clips of
--frames at --resolution and --fps; --samples an nbp-sample output folder (its record of decoded frames). Without
--tokenizer or --samples the ladder has fewer rungs. Prints the table; --json writes it, --tensorboard adds the
rates as scalars (quality/<rung>/<reading>) and the table as text.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from nbp_ds.cli import command, setup_logging
from nbp_ds.cli.check_consistency import ground_truth_files, load_classes
from nbp_ds.errors import UsageError
from nbp_ds.eval.quality import format_ladder, ladder_scalars, quality_ladder
from nbp_ds.files import write_text_atomic
from nbp_ds.generate.folder import recorded_videos
from nbp_ds.runtime.metrics import MetricsLogger
from nbp_ds.tokenizer.model import load_tokenizer
from nbp_ds.video_io import VideoError, decode_video

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", required=True, help="held-out videos: a folder of class subfolders <class>/*.mp4")
    p.add_argument("--tokenizer", help="the tokenizer whose reconstructions make the second rung")
    p.add_argument("--samples", help="an nbp-sample output folder: the third rung")
    p.add_argument("--classes", help="classes.json ({name: id}); default: the --videos folder's")
    p.add_argument("--frames", type=int, default=9, help="frames per clip (default 9, the quickstart's)")
    p.add_argument("--resolution", type=int, default=32, help="clip side in pixels (default 32)")
    p.add_argument("--fps", type=float, default=8.0, help="frame rate to decode at (default 8)")
    p.add_argument("--json", help="write the ladder to this JSON file")
    p.add_argument("--tensorboard", help="write the ladder to TensorBoard in this folder (its tb/)")
    p.add_argument("--workers", type=int, default=2, help="parallel video decoders (default 2)")
    args = p.parse_args(argv)
    if args.frames < 1 or args.resolution < 8 or args.fps <= 0 or args.workers < 1:
        p.error("--frames >= 1, --resolution >= 8, --fps > 0 and --workers >= 1, please")
    return args


def held_out_clips(folder: Path, classes: dict[str, int], frames: int, resolution: int, fps: float,
                   workers: int) -> tuple[np.ndarray, list[int]]:
    """The first ``frames`` frames of every video under folder/<class>/ (uint8 [N, T, R, R, 3]) and their labels."""
    files = ground_truth_files(folder, classes)
    if not files:
        raise UsageError(f"--videos {folder}: no <class>/*.mp4 files of a known class")
    try:
        with ThreadPoolExecutor(workers) as pool:
            clips = list(pool.map(lambda f: decode_video(f[0], fps, resolution)[:frames], files))
    except VideoError as exc:
        raise UsageError(str(exc)) from exc
    short = [str(path) for (path, _), clip in zip(files, clips, strict=True) if len(clip) < frames]
    if short:
        raise UsageError(f"--videos: {len(short)} videos have fewer than --frames {frames} frames, e.g. {short[0]}")
    return np.stack(clips), [label for _, label in files]


def sampled_clips(folder: Path) -> tuple[list[np.ndarray], list[int]]:
    """The decoded frames and labels nbp-sample recorded in ``folder``."""
    records = recorded_videos(folder)
    if not records:
        raise UsageError(f"--samples {folder}: no videos recorded by nbp-sample (videos.jsonl)")
    labelled = [r for r in records if r["label"] is not None]
    if not labelled:
        raise UsageError(f"--samples {folder}: the recorded videos carry no class label")
    return [np.load(r["frames_path"]) for r in labelled], [int(r["label"]) for r in labelled]


def run(args: argparse.Namespace) -> dict:
    folder = Path(args.videos)
    if not folder.is_dir():
        raise UsageError(f"--videos {folder}: no such folder")
    classes = load_classes(args.classes, folder)
    source, labels = held_out_clips(folder, classes, args.frames, args.resolution, args.fps, args.workers)
    tokenizer = None
    if args.tokenizer:

        tokenizer = load_tokenizer(args.tokenizer, "cpu").eval()
    samples, sample_labels = sampled_clips(Path(args.samples)) if args.samples else (None, None)
    log.info("quality ladder: %d held-out clips%s%s", len(source), ", their reconstructions" if tokenizer else "",
             f", {len(samples)} samples" if samples is not None else "")
    ladder = quality_ladder(source, labels, classes, tokenizer, samples, sample_labels)
    ladder["inputs"] = {"videos": str(folder), "tokenizer": args.tokenizer, "samples": args.samples,
                        "frames": args.frames, "resolution": args.resolution, "fps": args.fps}
    return ladder


@command
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    ladder = run(args)
    rungs = {k: v for k, v in ladder.items() if k != "inputs"}
    table = format_ladder(rungs)
    print("\nquality ladder (the class checker on each rung)\n" + table, flush=True)
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(ladder, indent=1) + "\n")
        log.info("wrote %s", args.json)
    if args.tensorboard:

        out = Path(args.tensorboard)
        out.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLogger(out, enabled=True)
        metrics.scalars(0, ladder_scalars(rungs))
        metrics.text("quality/ladder", "    " + table.replace("\n", "\n    "))  # indented: markdown code
        metrics.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
