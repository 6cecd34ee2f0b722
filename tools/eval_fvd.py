#!/usr/bin/env python
"""Compute the Fréchet Video Distance (FVD) between real and generated videos.

    python tools/eval_fvd.py --real data/ucf101_val/ --fake samples/ --i3d ~/i3d_torchscript.pt
    python tools/eval_fvd.py --real 'real/**/*.mp4' --fake 'gen/*.npy' --i3d i3d_torchscript.pt \\
        --max-videos 2048 --json fvd.json

Protocol (StyleGAN-V's, used by the NBP paper): the first 16 frames of each video, resized to 224x224 (bilinear),
scaled to [-1, 1] and embedded by StyleGAN-V's I3D Kinetics-400 TorchScript detector ('i3d_torchscript.pt');
FVD is the Fréchet distance between Gaussians fitted to the two feature sets. Published numbers use 2048 clips per
set ("fvd2048_16f"); with fewer clips than the 400 feature dimensions the score is biased and not comparable.

Inputs are .mp4 files (decoded with ffmpeg; ffmpeg and ffprobe must be on PATH) or .npy uint8 arrays [T, H, W, 3].
A directory is searched recursively; a glob pattern may use '**'. Files are taken in sorted order, so
--max-videos picks a deterministic subset.

The detector cannot be downloaded here: fetch i3d_torchscript.pt on a machine with internet and pass --i3d PATH.
Exit status: 0 on success, 2 on bad arguments (missing detector, no videos), 1 when decoding or scoring fails.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from nbp_ds.eval.fvd import DEFAULT_NUM_FRAMES, I3DFeatureExtractor, fvd_from_features, missing_detector_message

logger = logging.getLogger("eval_fvd")

VIDEO_SUFFIXES = (".mp4",)
ARRAY_SUFFIXES = (".npy",)


class UsageError(Exception):
    """Bad command-line input (exit status 2)."""


class ShortVideoError(ValueError):
    """A video has fewer frames than a clip needs."""


def list_videos(spec: str) -> list[Path]:
    """Video files named by ``spec``: a directory (searched recursively), one file, or a glob pattern."""
    suffixes = VIDEO_SUFFIXES + ARRAY_SUFFIXES
    path = Path(spec).expanduser()
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes]
    elif path.is_file():
        files = [path]
    else:
        files = [Path(p) for p in glob.glob(str(path), recursive=True)]
        files = [p for p in files if p.is_file() and p.suffix.lower() in suffixes]
    return sorted(files)


def _probe_size(path: Path) -> tuple[int, int]:
    """Width and height of the first video stream, from ffprobe."""
    cmd = ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "stream=width,height",
           "-of", "csv=p=0:s=x", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffprobe failed on {path}: {proc.stderr.strip()}")
    try:
        width, height = (int(v) for v in proc.stdout.strip().splitlines()[0].split("x")[:2])
    except (ValueError, IndexError):
        raise RuntimeError(f"ffprobe found no video stream in {path} (output: {proc.stdout.strip()!r})") from None
    return width, height


def decode_mp4(path: Path, num_frames: int) -> np.ndarray:
    """The first ``num_frames`` frames of a video file as uint8 [T, H, W, 3] RGB (T may be smaller if it is short)."""
    width, height = _probe_size(path)
    # -noautorotate: ffprobe reports the coded size, so frames must not be rotated by display-matrix metadata.
    # -frames:v: stop decoding after the frames the clip needs instead of decoding whole videos.
    cmd = ["ffmpeg", "-v", "error", "-nostdin", "-noautorotate", "-i", str(path), "-map", "0:v:0",
           "-frames:v", str(num_frames), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed on {path}: {proc.stderr.decode(errors='replace').strip()}")
    frame_bytes = width * height * 3
    if len(proc.stdout) % frame_bytes:
        raise RuntimeError(f"ffmpeg output of {path} is not a whole number of {width}x{height} RGB frames")
    return np.frombuffer(proc.stdout, dtype=np.uint8).reshape(-1, height, width, 3)


def load_clip(path: Path, num_frames: int) -> np.ndarray:
    """The first ``num_frames`` frames of one .mp4 or .npy video, uint8 [num_frames, H, W, 3]."""
    if path.suffix.lower() in ARRAY_SUFFIXES:
        # mmap: only the frames used are read from disk.
        video = np.load(path, mmap_mode="r")
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"{path}: expected a uint8 array [T, H, W, 3], got {video.dtype} {video.shape}")
        clip = np.array(video[:num_frames])
    else:
        clip = decode_mp4(path, num_frames)
    if clip.shape[0] < num_frames:
        raise ShortVideoError(f"{path}: has {clip.shape[0]} frames, FVD clips need {num_frames}")
    return clip


def iter_clips(
    files: list[Path], num_frames: int, skip_short: bool, skipped: list[Path], limit: int | None = None
) -> Iterator[np.ndarray]:
    """Decode ``files`` in order, one at a time (so only a batch of clips is in memory), until ``limit`` clips.

    Short videos raise, or with ``skip_short`` go to ``skipped`` and the next file takes their place (StyleGAN-V
    likewise discards videos shorter than a clip before counting).
    """
    produced = 0
    for path in files:
        if limit is not None and produced >= limit:
            return
        try:
            clip = load_clip(path, num_frames)
        except ShortVideoError as err:
            if not skip_short:
                raise RuntimeError(f"{err} (pass --skip-short to leave such videos out)") from None
            logger.warning("skipping %s", err)
            skipped.append(path)
            continue
        produced += 1
        yield clip


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
    parser.add_argument("--json", metavar="OUT", help="also write the FVD and the counts to this JSON file")
    return parser


def run(args: argparse.Namespace) -> dict:
    """Compute FVD for parsed arguments; returns the result record."""
    # Check the detector before touching any video: decoding thousands of files only to fail is a waste.
    if not args.i3d or not Path(args.i3d).expanduser().is_file():
        raise UsageError(missing_detector_message(args.i3d))
    if args.num_frames < 1 or args.batch_size < 1:
        raise UsageError("--num-frames and --batch-size must be >= 1")
    if args.max_videos is not None and args.max_videos < 2:
        raise UsageError("--max-videos must be >= 2 (a covariance needs at least 2 clips)")
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            logger.warning("%s not found on PATH: .mp4 inputs cannot be decoded (.npy inputs still work)", tool)

    sets: dict[str, list[Path]] = {}
    for name, spec in (("real", args.real), ("fake", args.fake)):
        files = list_videos(spec)
        if not files:
            raise UsageError(f"--{name} {spec!r}: no {'/'.join(VIDEO_SUFFIXES + ARRAY_SUFFIXES)} files found")
        sets[name] = files
        logger.info("%s: %d videos found from %s", name, len(files), spec)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    extractor = I3DFeatureExtractor(Path(args.i3d).expanduser(), device=device, num_frames=args.num_frames,
                                    batch_size=args.batch_size)
    logger.info("detector %s on %s", args.i3d, device)

    features: dict[str, np.ndarray] = {}
    skipped: dict[str, list[Path]] = {}
    for name, files in sets.items():
        skipped[name] = []
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
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        result = run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    print(f"FVD: {result['fvd']:.4f}  (real videos: {result['num_real']}, fake videos: {result['num_fake']}, "
          f"{result['num_frames']} frames each)")
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
