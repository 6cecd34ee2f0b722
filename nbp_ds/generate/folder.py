"""A sampler output folder: thousands of videos (FVD scale) generated in batches, decoded and written as they come,
resumable; ``nbp_ds.generate.sampler`` loads and checks what a run samples with, then streams it here.

An output folder holds::

    sampling.json        the run's settings; a rerun resumes only with the same ones
    videos.jsonl         one line per finished video, appended once all its files are in place:
                         {"index", "stem", "label", "frames": "frames/<stem>.npy", "tokens": "tokens/<stem>.npy",
                          "mp4": "<stem>.mp4" or null}
    <stem>.mp4           the video (H.264), unless mp4 writing is off
    frames/<stem>.npy    its decoded frames, uint8 [T, H, W, 3] (what FVD and the class check read: no codec loss)
    tokens/<stem>.npy    its token grid, int32 [T, H, W]
    grid.png             the first videos, a row of frames each

Stems are ``<class name>_<NNN>`` (``sample_<NNN>`` without classes), NNN counting within the class.

Video ``i`` of a run (its place in the job list: labels in the order given, ``num`` each) draws from the random
stream keyed by (seed, i), and batches are fixed slices of the job list, so every video comes out the same
whether the run was interrupted or not: a rerun skips the finished videos, regenerates a batch that was cut
short with the same composition, and writes only its unfinished videos. Each file is written under a temporary
name and renamed into place; the record line comes last, in one append, so a video is finished exactly when
its line is there (a line torn by a crash is dropped when the run resumes).

Memory stays bounded: one batch on the device, and at most a few batches of decoded frames waiting for the
writer threads, which overlap ffmpeg's encoding and the disk with generating the next batch.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nbp_ds.errors import UsageError
from nbp_ds.files import atomic_output, write_text_atomic
from nbp_ds.generate.decode import generate
from nbp_ds.generate.long import generate_long
from nbp_ds.video_io import write_video
from nbp_ds.visualize import frame_grid, save_png

log = logging.getLogger(__name__)

SETTINGS_FILE = "sampling.json"
RECORDS_FILE = "videos.jsonl"
FRAMES_DIR = "frames"
TOKENS_DIR = "tokens"
PREVIEW_VIDEOS = 16  # rows of grid.png


@dataclass(frozen=True)
class VideoJob:
    """One video of a run: its index in the job list (and its random stream), its label and its file stem."""

    index: int
    label: int | None
    stem: str


def plan_jobs(labels: Sequence[int | None], per_label: int, names: dict[int, str] | None = None) -> list[VideoJob]:
    """``per_label`` videos for each label in order (``[None]`` for a model without classes), named
    ``<class name>_<NNN>`` (``class<i>`` without a name, ``sample`` without a label)."""
    names = names or {}
    width = max(3, len(str(per_label - 1)))
    jobs = []
    for label in labels:
        prefix = "sample" if label is None else names.get(label, f"class{label}")
        for k in range(per_label):
            jobs.append(VideoJob(len(jobs), label, f"{prefix}_{k:0{width}d}"))
    return jobs


def batches_of(jobs: Sequence[VideoJob], batch_size: int) -> list[list[VideoJob]]:
    """Fixed slices of the job list: a batch is the same set of videos in every run of the same settings."""
    return [list(jobs[i:i + batch_size]) for i in range(0, len(jobs), batch_size)]


# ---- the run's record ----------------------------------------------------------------------------------------
def read_records(folder: str | Path) -> dict[int, dict]:
    """Finished videos of an output folder by index (the last record of an index wins; a torn line is skipped)."""
    path = Path(folder) / RECORDS_FILE
    records: dict[int, dict] = {}
    if not path.is_file():
        return records
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
            records[int(record["index"])] = record
        except (ValueError, KeyError, TypeError):
            log.warning("%s:%d: not a complete record, ignored (an interrupted write)", path, number)
    return records


def recorded_videos(folder: str | Path) -> list[dict] | None:
    """The finished videos of a sampler output folder in job order, each record with absolute paths in
    ``frames_path`` / ``tokens_path``; None when ``folder`` is not one (no videos.jsonl)."""
    folder = Path(folder)
    if not (folder / RECORDS_FILE).is_file():
        return None
    by_index = read_records(folder)
    records = [by_index[i] for i in sorted(by_index)]
    for record in records:
        record["frames_path"] = folder / record["frames"]
        record["tokens_path"] = folder / record["tokens"]
    return records


def sampled_frame_files(spec: str | Path) -> list[Path] | None:
    """The decoded-frame files of a sampler output folder (what FVD should read: one per video, no codec in
    between), or None when ``spec`` is not such a folder."""
    records = recorded_videos(spec) if Path(spec).is_dir() else None
    return None if records is None else [r["frames_path"] for r in records]


class RecordLog:
    """videos.jsonl, appended by the writer threads: one ``write`` of a whole line per video, then fsync."""

    def __init__(self, path: Path):
        self.path = path
        self._repair()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def _repair(self) -> None:
        """Cut a torn last line (a crash mid-append), so that the next record starts on a line of its own."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            log.warning("%s: dropping an unfinished last line (%d bytes)", self.path, len(data) - keep)
            with open(self.path, "r+b") as f:
                f.truncate(keep)

    def append(self, record: dict) -> None:
        line = (json.dumps(record) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)
            os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def clear_run(out: Path) -> int:
    """Delete what an earlier run of the sampler wrote in ``out`` (the files its records name, the record, the
    settings, the preview); other files stay. Returns the number of files deleted."""
    records = read_records(out)
    names = [SETTINGS_FILE, RECORDS_FILE, "grid.png"]
    for record in records.values():
        names += [record["frames"], record["tokens"]] + ([record["mp4"]] if record.get("mp4") else [])
    deleted = 0
    for name in names:
        path = out / name
        if path.is_file():
            path.unlink()
            deleted += 1
    return deleted


def open_run(out: Path, settings: dict, restart: bool = False) -> dict[int, dict]:
    """Create or resume an output folder; returns the finished videos. Refuses (UsageError) a folder whose run had
    other settings, naming each difference, unless ``restart`` discards that run (``clear_run``). Leftover
    temporary files of an interrupted run are removed."""
    path = out / SETTINGS_FILE
    if path.is_file() and restart:
        log.info("discarding the earlier run in %s: %d files deleted", out, clear_run(out))
    elif path.is_file():
        previous = json.loads(path.read_text())
        changed = {k: (previous.get(k), settings.get(k)) for k in sorted(set(previous) | set(settings))
                   if previous.get(k) != settings.get(k)}
        if changed:
            lines = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise UsageError(f"--out {out} holds a run with other settings ({lines}); resume it with the same "
                             f"settings, sample into another folder, or pass --restart to discard it")
    elif out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out} is not empty and holds no {SETTINGS_FILE}: not a sampler output folder "
                         f"to resume; choose an empty or new folder")
    for folder in (out, out / FRAMES_DIR, out / TOKENS_DIR):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".*.tmp*"):  # atomic_output's temporary names: a killed run's unfinished files
            stale.unlink(missing_ok=True)
    if not path.is_file():
        write_text_atomic(path, json.dumps(settings, indent=1) + "\n")
    finished = {}
    for index, record in read_records(out).items():
        files = [record["frames"], record["tokens"]] + ([record["mp4"]] if record.get("mp4") else [])
        if all((out / f).is_file() for f in files):
            finished[index] = record
        else:
            log.warning("video %d (%s) is recorded but some of its files are gone: it is made again", index,
                        record.get("stem"))
    return finished


# ---- writing ---------------------------------------------------------------------------------------------------
class VideoWriter:
    """Writes finished videos on worker threads (ffmpeg runs as a subprocess, numpy writes release the GIL), at
    most ``max_pending`` videos waiting at once, so memory stays bounded however many videos are made."""

    def __init__(self, out: Path, records: RecordLog, fps: float, mp4: bool, workers: int, max_pending: int,
                 on_done: Callable[[VideoJob], None] | None = None):
        self.out, self.records, self.fps, self.mp4 = out, records, fps, mp4
        self.on_done = on_done
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="video-writer")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._futures: list[Future] = []

    def submit(self, job: VideoJob, tokens: np.ndarray, frames: np.ndarray) -> None:
        """Queue one video (blocks while ``max_pending`` are waiting); raises a failed earlier write's error."""
        self._raise_failures()
        self._slots.acquire()
        future = self._pool.submit(self._write, job, tokens, frames)
        future.add_done_callback(lambda _: self._slots.release())
        self._futures.append(future)

    def _write(self, job: VideoJob, tokens: np.ndarray, frames: np.ndarray) -> None:
        frames_file, tokens_file = f"{FRAMES_DIR}/{job.stem}.npy", f"{TOKENS_DIR}/{job.stem}.npy"
        with atomic_output(self.out / tokens_file, suffix=".npy") as tmp:
            np.save(tmp, tokens.astype(np.int32))
        with atomic_output(self.out / frames_file, suffix=".npy") as tmp:
            np.save(tmp, frames)
        mp4 = None
        if self.mp4:
            mp4 = f"{job.stem}.mp4"
            with atomic_output(self.out / mp4, suffix=".mp4") as tmp:
                write_video(frames, tmp, fps=self.fps)
        self.records.append({"index": job.index, "stem": job.stem, "label": job.label, "frames": frames_file,
                             "tokens": tokens_file, "mp4": mp4})
        if self.on_done is not None:
            self.on_done(job)

    def _raise_failures(self) -> None:
        for future in [f for f in self._futures if f.done()]:
            self._futures.remove(future)
            future.result()  # raises the writer's error here, in the generating thread

    def close(self) -> None:
        """Wait for every queued video; raise the first error."""
        self._pool.shutdown(wait=True)
        for future in self._futures:
            future.result()
        self._futures.clear()


# ---- the run -----------------------------------------------------------------------------------------------------
@dataclass
class SamplingSummary:
    videos: int  # made by this run
    skipped: int  # finished before it
    forward_passes: int  # per video
    generate_seconds: float  # generation only (device time, synchronised per batch)
    frames: int  # video frames made by this run
    seconds: float = 0.0  # the whole run: generating, decoding and writing

    @property
    def finished(self) -> int:
        """Videos of the run in the folder now."""
        return self.skipped + self.videos


def sample_to_folder(model, tokenizer, jobs: Sequence[VideoJob], out: str | Path, settings: dict, *,
                     batch_size: int, seed: int, sampling: dict, context: torch.Tensor | None = None,
                     fps: float = 8.0, mp4: bool = True, writers: int = 4, mode: str = "auto",
                     restart: bool = False, progress: bool = True, long: dict | None = None) -> SamplingSummary:
    """Generate every unfinished video of ``jobs`` into ``out`` (see the module docstring for the layout).

    ``settings`` is what identifies the run (recorded in sampling.json and compared on resume); ``sampling``
    holds generate's temperature / top_k / top_p / cfg_scale; ``context`` [1, c, H, W] conditions every video
    of a frame-prediction model; ``restart`` discards an earlier run in ``out`` instead of resuming it; ``long``
    (generate_long's latent_frames, long_mode, sink_frames) makes videos longer than the model's clip."""
    began = time.perf_counter()
    out = Path(out)
    finished = open_run(out, settings, restart)
    todo = [b for b in batches_of(jobs, batch_size) if any(j.index not in finished for j in b)]
    if finished:
        log.info("%s: %d of %d videos already finished; %d batches to go", out, len(finished), len(jobs), len(todo))
    records = RecordLog(out / RECORDS_FILE)
    bar = tqdm(total=len(jobs), initial=len(finished), unit="video", desc="sampling", dynamic_ncols=True,
               disable=not progress)
    writer = VideoWriter(out, records, fps, mp4, writers, max_pending=2 * batch_size, on_done=lambda _: bar.update())
    summary = SamplingSummary(0, len(finished), len(model.layout.generation_steps), 0.0, 0)
    device = next(model.parameters()).device
    try:
        for batch in todo:
            n = len(batch)
            label = torch.tensor([j.label for j in batch]) if batch[0].label is not None else None
            ctx = context.expand(n, *context.shape[1:]).to(device) if context is not None else None
            make = generate if long is None else partial(generate_long, **long)
            tokens, stats = make(model, n, label=label, context=ctx, seed=seed,
                                 video_index=[j.index for j in batch], mode=mode, **sampling)
            summary.generate_seconds += stats["seconds"]
            summary.forward_passes = stats["forward_passes"]
            with torch.no_grad():
                # a long video in pieces: the decoder's memory does not grow with its length
                decode = tokenizer.decode if long is None else tokenizer.decode_long
                frames = decode(tokens.to(tokenizer.device)).cpu().numpy()
            tokens = tokens.cpu().numpy()
            for i, job in enumerate(batch):
                if job.index in finished:  # a batch cut short by an interruption: only its unfinished videos
                    continue
                writer.submit(job, tokens[i], frames[i])
                summary.videos += 1
                summary.frames += frames.shape[1]
    finally:
        writer.close()
        records.close()
        bar.close()
    preview = recorded_videos(out)[:PREVIEW_VIDEOS]
    if preview:
        save_png(out / "grid.png", frame_grid(np.stack([np.load(r["frames_path"]) for r in preview])))
    summary.seconds = time.perf_counter() - began
    return summary
