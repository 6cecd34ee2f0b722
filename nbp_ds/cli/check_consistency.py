"""Check that videos of the synthetic moving-shapes world show their class (shape and direction of motion).

    nbp-check-consistency samples/ --classes shards/train/classes.json --json samples/c.json
    nbp-check-consistency --videos data/shapes/val --classes data/shapes/classes.json

Two inputs:

* SAMPLES_DIR, the output of nbp-sample: its record of finished videos (videos.jsonl) names each video's label
  and decoded frames (frames/<stem>.npy, uint8 [T, H, W, 3]), which are read directly: no codec in between.
  Without a record, every `<class name>_<NNN>.mp4` in it (not searched recursively); the label comes from the
  file name's prefix looked up in --classes, never from file order, and files whose prefix is not a class (e.g.
  `sample_000.mp4` of an unconditional model) are skipped with a warning. A folder holding all decoded frames as
  one array (`videos.npy` or `frames.npy`, uint8 [N, T, H, W, 3]) next to `labels.npy` with N class ids in the
  same order is read that way too.
* --videos DIR, a folder of class subfolders (`DIR/<class name>/*.mp4`, as nbp-make-synthetic-videos writes):
  checks ground truth, i.e. validates the checker itself.

Each video is decoded at --fps at its own resolution (the first video's width, or --resolution) and read by
nbp_ds.eval.consistency: the object is the largest blob far from the border's colour; its shape comes from how it
fills its bounding box (and how much of it lies in the box's upper half), its direction from the least-squares
motion of its centroid, its colour from the blob's median colour (one palette colour from the first frame to the
last). Prints a table per class and the overall (shape and direction both right), shape, direction and colour
rates; --json writes them with one record per video. --window-frames N (long samples, nbp-sample --frames) also
reads every video in consecutive windows of N frames and prints, per window, how many show their class and how
many keep the shape and the colour their first window showed (--json: "window_consistency").

Exit status: 0 on success, 1 when --min-rate is given and the overall rate is below it, 2 on bad input (no videos,
unknown class names, undecodable files).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nbp_ds.cli import command, setup_logging
from nbp_ds.errors import UsageError
from nbp_ds.eval.consistency import consistency_report, format_report
from nbp_ds.eval.synthetic import CLASSES, parse_class
from nbp_ds.eval.windows import format_window_table, window_consistency
from nbp_ds.generate.folder import RECORDS_FILE, recorded_videos

log = logging.getLogger(__name__)
ARRAY_NAMES = ("videos.npy", "frames.npy")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", nargs="?", help="folder of sampled videos <class>_<NNN>.mp4 (nbp-sample --out)")
    p.add_argument("--videos", help="instead: a folder of class subfolders <class>/*.mp4 (ground truth)")
    p.add_argument("--classes", help="classes.json ({name: id}); default: the folder's classes.json, else the "
                                     "12 synthetic classes")
    p.add_argument("--json", help="write the report (rates, per class, per video) to this JSON file")
    p.add_argument("--fps", type=float, default=8.0, help="frame rate to decode at (default 8, the quickstart's)")
    p.add_argument("--resolution", type=int, default=None,
                   help="decode at this size (default: the first video's own width, used for all of them)")
    p.add_argument("--min-rate", type=float, default=None,
                   help="exit with status 1 when the overall rate is below this (0..1)")
    p.add_argument("--window-frames", type=int, default=None, metavar="N",
                   help="also read each video in consecutive windows of N frames (the model's clip, 9 for the "
                        "quickstart's): per window, the share showing its class and keeping window 1's shape and "
                        "colour (long samples, nbp-sample --frames)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel decoders (default: CPU cores)")
    args = p.parse_args(argv)
    if (args.samples is None) == (args.videos is None):
        p.error("give either SAMPLES_DIR or --videos DIR (exactly one)")
    if args.fps <= 0:
        p.error("--fps must be > 0")
    if args.workers < 1:
        p.error("--workers must be >= 1")
    if args.window_frames is not None and args.window_frames < 2:
        p.error("--window-frames must be >= 2 (a direction needs two frames)")
    if args.resolution is not None and args.resolution < 8:
        p.error("--resolution must be >= 8")
    return args


def load_classes(path: str | None, folder: Path) -> dict[str, int]:
    """{name: id} from --classes, else folder/classes.json, else the synthetic classes; every name must parse."""
    candidates = [Path(path)] if path else [folder / "classes.json"]
    for candidate in candidates:
        if candidate.is_file():
            try:
                classes = {str(k): int(v) for k, v in json.loads(candidate.read_text()).items()}
            except (ValueError, AttributeError) as exc:
                raise UsageError(f"--classes {candidate}: not a JSON object of name -> id ({exc})") from exc
            break
        if path:
            raise UsageError(f"--classes {candidate}: no such file")
    else:
        classes = {name: i for i, name in enumerate(CLASSES)}
    for name in classes:
        try:
            parse_class(name)
        except ValueError as exc:
            raise UsageError(f"class list: {exc}") from exc
    return classes


def decode(path: Path, fps: float, resolution: int) -> np.ndarray:
    """All frames of a video at `fps`, scaled and center-cropped to `resolution` (uint8 [N, R, R, 3])."""
    from nbp_ds.video_io import decode_video  # local: --help answers before torch loads

    return decode_video(path, fps, resolution)


def sample_files(folder: Path, classes: dict[str, int]) -> list[tuple[Path, int]]:
    """(mp4, label) for each `<class>_<NNN>.mp4` in a sampler output folder; the label comes from the name."""
    found = []
    for path in sorted(folder.glob("*.mp4")):
        prefix = path.stem.rsplit("_", 1)[0]
        if prefix not in classes:
            log.warning("skipping %s: '%s' is not a class in the class list", path.name, prefix)
            continue
        found.append((path, classes[prefix]))
    return found


def ground_truth_files(folder: Path, classes: dict[str, int]) -> list[tuple[Path, int]]:
    """(mp4, label) for each `<class>/*.mp4` under a folder of class subfolders."""
    found = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sub.name not in classes:
            log.warning("skipping folder %s: not a class in the class list", sub)
            continue
        found += [(path, classes[sub.name]) for path in sorted(sub.glob("*.mp4"))]
    return found


def saved_arrays(folder: Path) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(videos, labels, file name) when the sampler left decoded frames and labels of matching length."""
    labels_path = folder / "labels.npy"
    for name in ARRAY_NAMES:
        path = folder / name
        if not (path.is_file() and labels_path.is_file()):
            continue
        videos, labels = np.load(path, mmap_mode="r"), np.load(labels_path)
        if videos.ndim == 5 and videos.shape[-1] == 3 and labels.shape == (videos.shape[0],):
            return videos, labels, name
        log.warning("ignoring %s: shape %s does not match labels.npy %s (want [N, T, H, W, 3] and [N])", path,
                    videos.shape, labels.shape)
    return None


def sampler_record(folder: Path, names: dict[int, str]) -> tuple[list[Path], list[int]] | None:
    """(frames files, labels) of the labelled videos nbp-sample recorded in ``folder``; None without a record."""
    records = recorded_videos(folder)
    if records is None:
        return None
    labelled = [r for r in records if r["label"] is not None]
    if len(labelled) < len(records):
        log.warning("skipping %d recorded videos without a label (an unconditional model)",
                    len(records) - len(labelled))
    bad = sorted({r["label"] for r in labelled} - set(names))
    if bad:
        raise UsageError(f"{folder / RECORDS_FILE}: label {bad[0]} is not in the class list")
    return [r["frames_path"] for r in labelled], [r["label"] for r in labelled]


def run(args: argparse.Namespace) -> dict:
    folder = Path(args.videos or args.samples)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder")
    classes = load_classes(args.classes, folder)
    names = {i: name for name, i in classes.items()}

    recorded = None if args.videos else sampler_record(folder, names)
    arrays = None if args.videos or recorded is not None else saved_arrays(folder)
    if recorded is not None:
        files, labels = recorded
        if not files:
            raise UsageError(f"{folder}: nbp-sample recorded no labelled videos here")
        log.info("checking %d videos recorded in %s (decoded frames saved by the sampler)", len(files), folder)
        report = checked(lambda: (np.load(f) for f in files), labels, classes,
                         [str(f.relative_to(folder)) for f in files], args.window_frames)
        report["source"] = str(folder / RECORDS_FILE)
    elif arrays is not None:
        videos, labels, source = arrays
        bad = sorted({int(v) for v in labels} - set(names))
        if bad:
            raise UsageError(f"{folder / 'labels.npy'}: label {bad[0]} is not in the class list")
        log.info("checking %d videos from %s (decoded frames saved by the sampler)", len(videos), folder / source)
        ids = [f"{source}[{i}]" for i in range(len(videos))]
        report = checked(lambda: (np.asarray(v) for v in videos), labels, classes, ids, args.window_frames)
        report["source"] = str(folder / source)
    else:
        files = ground_truth_files(folder, classes) if args.videos else sample_files(folder, classes)
        if not files:
            raise UsageError(f"{folder}: no labelled mp4 files found (expected "
                             f"{'<class>/*.mp4' if args.videos else '<class>_<NNN>.mp4'})")
        log.info("checking %d videos in %s", len(files), folder)
        from nbp_ds.video_io import VideoError, probe_video  # local: --help answers before torch loads

        try:
            # Probing costs an ffprobe process per file (as much as decoding such tiny videos): probe the first
            # only. A video of another size would just be rescaled, which the checker does not mind.
            resolution = args.resolution or probe_video(files[0][0]).width
            with ThreadPoolExecutor(args.workers) as pool:
                # Decoding is an ffmpeg subprocess per file: threads overlap them without pickling frames around.
                # The report consumes the decoded clips as they come, so memory stays flat however many files.
                def decoded():
                    return tqdm(pool.map(lambda f: decode(f[0], args.fps, resolution), files), total=len(files),
                                unit="video", desc="checking", dynamic_ncols=True)

                report = checked(decoded, [label for _, label in files], classes,
                                 [str(path.relative_to(folder)) for path, _ in files], args.window_frames)
        except VideoError as exc:
            raise UsageError(str(exc)) from exc
        report["source"] = str(folder)
    report["fps"] = args.fps
    return report


def checked(videos: Callable[[], Iterable[np.ndarray]], labels: list[int], classes: dict[str, int], ids: list[str],
            window_frames: int | None) -> dict:
    """The consistency report of the videos ``videos()`` yields, plus with ``window_frames`` the window-by-window
    table (under "window_consistency"). Each reading streams the videos afresh, so memory stays flat."""
    report = consistency_report(videos(), labels, classes, ids=ids)
    if window_frames is not None:
        report["window_consistency"] = window_consistency(videos(), labels, classes, window_frames)
    return report


@command
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    report = run(args)
    print(format_report(report))
    print(f"class consistency over {report['count']} videos: overall {100 * report['overall_rate']:.1f}% "
          f"(shape {100 * report['shape_rate']:.1f}%, direction {100 * report['direction_rate']:.1f}%, colour "
          f"{100 * report['color_rate']:.1f}%)", flush=True)
    if "window_consistency" in report:
        print(f"\nwindow by window (consecutive windows of {args.window_frames} frames; kept: what window 1 read)")
        print(format_window_table(report["window_consistency"]))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        log.info("wrote %s", out)
    if args.min_rate is not None and report["overall_rate"] < args.min_rate:
        print(f"overall rate {report['overall_rate']:.3f} is below --min-rate {args.min_rate}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
