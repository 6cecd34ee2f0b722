"""Writing the synthetic moving-shape dataset (the quickstart's videos) as labelled mp4 files.

    OUT/classes.json                        {class name: class id}, also copied to OUT/train and OUT/val
    OUT/world.json                          the world's parameters (frames, size, fps, seed, object size)
    OUT/train/<class>/<class>_<i:04d>.mp4   per_class videos per class
    OUT/val/<class>/<class>_<i:04d>.mp4     val_per_class videos per class (different random draws)

Each video is drawn from its own seed, derived from (seed, split, class, index), so the output does not
depend on the number of workers or on which videos already existed; existing non-empty files are kept
(a rerun resumes), and every file is written atomically. A rerun with other parameters than ``world.json``
records is refused (it would mix two worlds in one folder).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nbp_ds.eval.synthetic import CLASSES, SIZE_RANGE, check_object_size, parse_class, render_clip
from nbp_ds.files import atomic_output, write_text_atomic
from nbp_ds.video_io import write_video

log = logging.getLogger(__name__)
SPLITS = ("train", "val")


@dataclass(frozen=True)
class VideoJob:
    out: str
    split: str
    name: str
    index: int
    frames: int
    size: int
    fps: float
    seed: int
    object_size: tuple[float, float] = SIZE_RANGE


def video_path(out: Path, split: str, name: str, index: int) -> Path:
    """Where video `index` of class `name` in `split` goes."""
    return out / split / name / f"{name}_{index:04d}.mp4"


def video_rng(seed: int, split: str, class_index: int, index: int) -> np.random.Generator:
    """The generator of one video: independent streams per (seed, split, class, index), so train and val differ."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), class_index, index]))


def make_video(job: VideoJob) -> str:
    """Render and encode one video (runs in a worker process). Returns its path."""
    final = video_path(Path(job.out), job.split, job.name, job.index)
    shape, direction = parse_class(job.name)
    clip = render_clip(shape, direction, job.frames, job.size,
                       video_rng(job.seed, job.split, CLASSES.index(job.name), job.index), job.object_size)
    with atomic_output(final, suffix=".mp4") as tmp:  # ffmpeg picks the container from the suffix
        write_video(clip, tmp, fps=job.fps)
    return str(final)


def record_world(out: Path, world: dict) -> None:
    """Write OUT/world.json, or check that the one there records the same world (ValueError naming each
    parameter that differs): the videos already in OUT are kept, so they must be of this world."""
    path = out / "world.json"
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [f"{key} {before.get(key)} -> {value}" for key, value in world.items() if before.get(key) != value]
        if changed:
            raise ValueError(f"{out} holds videos of another world ({path}: {'; '.join(changed)}): write to another "
                             f"folder, or delete this one to make it anew")
        return
    write_text_atomic(path, json.dumps(world, indent=2) + "\n")


def write_dataset(out: Path, per_class: int, val_per_class: int, frames: int, size: int, fps: float, seed: int,
                  workers: int, object_size: tuple[float, float] = SIZE_RANGE) -> tuple[int, int]:
    """Make the missing videos of the dataset; (videos made, videos already there)."""
    object_size = check_object_size(object_size)
    out.mkdir(parents=True, exist_ok=True)
    record_world(out, {"frames": frames, "size": size, "fps": fps, "seed": seed, "object_size": list(object_size)})
    classes = {name: i for i, name in enumerate(CLASSES)}
    for folder in (out, out / "train", out / "val"):
        write_text_atomic(folder / "classes.json", json.dumps(classes, indent=2) + "\n")
    counts = {"train": per_class, "val": val_per_class}
    jobs, kept = [], 0
    for split in SPLITS:
        for name in CLASSES:
            for index in range(counts[split]):
                path = video_path(out, split, name, index)
                if path.is_file() and path.stat().st_size > 0:
                    kept += 1  # resume: a finished video from an earlier run
                    continue
                jobs.append(VideoJob(str(out), split, name, index, frames, size, fps, seed, object_size))
    log.info("%d videos to make, %d already there, in %s (%d classes, %d frames of %dx%d at %g fps, objects %g-%g "
             "of the side, %d workers)", len(jobs), kept, out, len(CLASSES), frames, size, size, fps, *object_size,
             workers)
    workers = min(workers, max(1, len(jobs)))
    with tqdm(total=len(jobs), unit="video", desc="videos", dynamic_ncols=True, disable=not jobs) as bar:
        if workers == 1:
            for job in jobs:
                make_video(job)
                bar.update()
        else:
            # Each video costs one ffmpeg process start (~50 ms) plus a few ms of numpy: process start-up dominates
            # and parallelises across cores. Fork (where there is one) rather than spawn: nbp_ds imports torch
            # (~1 s per spawned worker). Small chunks keep the progress bar moving.
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            with mp.get_context(method).Pool(workers) as pool:
                for _ in pool.imap_unordered(make_video, jobs, chunksize=4):
                    bar.update()
    return len(jobs), kept
