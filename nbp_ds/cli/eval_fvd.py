"""Compute the Fréchet Video Distance (FVD) between real and generated videos.

    nbp-eval-fvd --real data/ucf101_val/ --fake samples/ --i3d ~/i3d_torchscript.pt
    nbp-eval-fvd --real 'real/**/*.mp4' --fake 'gen/*.npy' --i3d i3d_torchscript.pt \\
        --max-videos 2048 --json fvd.json

Protocol (StyleGAN-V's, used by the NBP paper): the first 16 frames of each video, resized to 224x224 (bilinear),
scaled to [-1, 1] and embedded by StyleGAN-V's I3D Kinetics-400 TorchScript detector ('i3d_torchscript.pt');
FVD is the Fréchet distance between Gaussians fitted to the two feature sets. Published numbers use 2048 clips per
set ("fvd2048_16f"); with fewer clips than the 400 feature dimensions the score is biased and not comparable.

Inputs are video files (.mp4, .avi, ...; decoded with ffmpeg at their own rate and size) or .npy uint8 arrays
[T, H, W, 3]. A directory is searched recursively; a glob pattern may use '**'. Files are taken in sorted order,
so --max-videos picks a deterministic subset. An nbp-sample output folder is read through its record
(videos.jsonl): each finished video's decoded frames (frames/<stem>.npy, no codec in between), in job order.

Long videos (nbp-sample --frames): --window-frames N reads every generated video window by window
(consecutive windows of N frames; give the model's clip, 17 frames for the paper's presets, 9 for the
quickstart's) and prints one FVD per window index k, the first --num-frames frames of window k of every video
that reaches it against the real clips. Window 1 is the clip read without windows: FVD 1 is the ordinary FVD.

    nbp-eval-fvd --real data/ucf101_val/ --fake long_samples/ --i3d i3d_torchscript.pt --window-frames 17

The detector cannot be downloaded here: fetch i3d_torchscript.pt on a machine with internet and pass --i3d PATH.
Exit status: 0 on success, 2 on bad arguments (missing detector, no videos), 1 when decoding or scoring fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from nbp_ds import ffmpeg_tools
from nbp_ds.cli import command, setup_logging
from nbp_ds.errors import UsageError
from nbp_ds.eval.fvd import (
    DEFAULT_NUM_FRAMES,
    I3DFeatureExtractor,
    fvd_from_features,
    iter_clips,
    missing_detector_message,
)
from nbp_ds.eval.window_fvd import format_window_fvds, window_features, window_fvds
from nbp_ds.generate.folder import sampled_frame_files
from nbp_ds.video_io import ARRAY_SUFFIXES, VIDEO_SUFFIXES, find_videos

logger = logging.getLogger(__name__)
SUFFIXES = VIDEO_SUFFIXES + ARRAY_SUFFIXES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", required=True, metavar="DIR_OR_GLOB",
                        help="real videos: a directory (searched recursively), a file or a glob of .mp4/.npy files")
    parser.add_argument("--fake", required=True, metavar="DIR_OR_GLOB", help="generated videos, same forms as --real")
    parser.add_argument("--i3d", metavar="PATH",
                        help="(required) StyleGAN-V's I3D TorchScript detector 'i3d_torchscript.pt'; it cannot be "
                             "downloaded from here, fetch it on a machine with internet")
    parser.add_argument("--num-frames", type=int, default=DEFAULT_NUM_FRAMES,
                        help="frames per clip, taken from the start of each video (default: %(default)s)")
    parser.add_argument("--max-videos", type=int, default=None, metavar="N",
                        help="use the first N usable videos (sorted by path) of each set; published FVDs use 2048")
    parser.add_argument("--batch-size", type=int, default=16, help="clips per detector call (default: %(default)s)")
    parser.add_argument("--device", default=None,
                        help="torch device for the detector (default: cuda if available, else cpu)")
    parser.add_argument("--skip-short", action="store_true",
                        help="leave out videos shorter than --num-frames (counted in the output) instead of failing")
    parser.add_argument("--window-frames", type=int, default=None, metavar="N",
                        help="read each generated video in consecutive windows of N frames (the model's clip) and "
                             "report one FVD per window index (quality over time of long samples)")
    parser.add_argument("--json", metavar="OUT", help="also write the FVD and the counts to this JSON file")
    return parser


def run(args: argparse.Namespace) -> dict:
    """Compute FVD for parsed arguments; returns the result record."""
    # Check the detector before touching any video: decoding thousands of files only to fail is a waste.
    if not args.i3d or not Path(args.i3d).expanduser().is_file():
        raise UsageError(missing_detector_message(args.i3d))
    if args.num_frames < 1 or args.batch_size < 1:
        raise UsageError("--num-frames and --batch-size must be >= 1")
    if args.window_frames is not None and args.window_frames < args.num_frames:
        raise UsageError(f"--window-frames {args.window_frames} is shorter than --num-frames {args.num_frames}: "
                         f"each window gives one clip of --num-frames frames")
    if args.max_videos is not None and args.max_videos < 2:
        raise UsageError("--max-videos must be >= 2 (a covariance needs at least 2 clips)")
    for tool in ffmpeg_tools.TOOLS:
        if ffmpeg_tools.find_tool(tool) is None:
            logger.warning("%s not found: .mp4 inputs cannot be decoded (.npy inputs still work); %s", tool,
                           ffmpeg_tools.INSTALL_HINT)

    sets: dict[str, list[Path]] = {}
    for name, spec in (("real", args.real), ("fake", args.fake)):
        files = sampled_frame_files(spec) or find_videos(spec, SUFFIXES)
        if not files:
            raise UsageError(f"--{name} {spec!r}: no {'/'.join(SUFFIXES)} files found")
        sets[name] = files
        logger.info("%s: %d videos found from %s", name, len(files), spec)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    extractor = I3DFeatureExtractor(Path(args.i3d).expanduser(), device=device, num_frames=args.num_frames,
                                    batch_size=args.batch_size)
    logger.info("detector %s on %s", args.i3d, device)

    features: dict[str, np.ndarray] = {}
    skipped: dict[str, list[Path]] = {}
    windows = None
    for name, files in sets.items():
        skipped[name] = []
        if name == "fake" and args.window_frames is not None:
            per_window = window_features(extractor, files, args.window_frames, args.skip_short, skipped[name],
                                         limit=args.max_videos, progress=True)
            usable = per_window[0].shape[0] if per_window else 0
            if usable < 2:
                raise UsageError(f"--fake: only {usable} usable video(s); FVD needs at least 2")
            windows = window_fvds(features["real"], per_window)
            features[name] = per_window[0]  # window 1: the clip FVD reads without windows
            continue
        clips = iter_clips(files, args.num_frames, args.skip_short, skipped[name], limit=args.max_videos)
        total = min(len(files), args.max_videos) if args.max_videos else len(files)
        features[name] = extractor.features(clips, desc=f"I3D {name}", total=total)
        if features[name].shape[0] < 2:
            raise UsageError(f"--{name}: only {features[name].shape[0]} usable video(s); FVD needs at least 2")

    fvd = fvd_from_features(features["real"], features["fake"])
    return {
        "fvd": fvd,
        "num_real": int(features["real"].shape[0]),
        "num_fake": int(features["fake"].shape[0]),
        "skipped_real": len(skipped["real"]),
        "skipped_fake": len(skipped["fake"]),
        "num_frames": args.num_frames,
        "real": args.real,
        "fake": args.fake,
        "i3d": str(args.i3d),
        "device": str(device),
        **({"window_frames": args.window_frames, "windows": windows} if windows is not None else {}),
    }


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        result = run(args)
    except (RuntimeError, ValueError, OSError) as err:  # a video that cannot be decoded or is short, a detector error
        print(f"error: {err}", file=sys.stderr)
        return 1

    print(f"FVD: {result['fvd']:.4f}  (real videos: {result['num_real']}, fake videos: {result['num_fake']}, "
          f"{result['num_frames']} frames each)")
    if "windows" in result:
        print(f"per window of {result['window_frames']} frames (the first {result['num_frames']} of each):")
        print(format_window_fvds(result["windows"], result["window_frames"]))
    if result["skipped_real"] or result["skipped_fake"]:
        print(f"skipped as too short: {result['skipped_real']} real, {result['skipped_fake']} fake")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
