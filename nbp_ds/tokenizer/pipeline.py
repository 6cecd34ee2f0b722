"""Videos -> token shards, resumable and split across array tasks.

The video list (sorted) is dealt to tasks round-robin; each task cuts its share into fixed groups of
videos, and each group becomes one shard `shard-t{task:03d}-{group:06d}.tar`. A group is done when its
manifest (`manifests/<shard>.json`: videos, clips, failures) exists, written after the shard got its
final name; a rerun skips done groups and redoes the rest, so an interruption never duplicates or loses
a clip. Decoding runs in worker processes (nbp_ds/worker_pool.py), in order, while the tokenizer encodes
batches of clips; a video whose worker dies (a decoder crash, the OOM killer) or that takes longer than
`video_timeout` is listed as a failure (`worker_died`, `timeout`), its worker replaced, and the run goes on.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nbp_ds.data.writer import TokenShardWriter
from nbp_ds.errors import UsageError
from nbp_ds.files import write_text_atomic
from nbp_ds.tokenizer.array_split import record_split
from nbp_ds.tokenizer.dataset_listing import VideoEntry, class_ids, list_dataset, sample_key
from nbp_ds.tokenizer.model import load_tokenizer
from nbp_ds.video_io import ClipShapes, ClipSpec, ClipTooShort, VideoError
from nbp_ds.worker_pool import LostJob, ordered_map

log = logging.getLogger(__name__)

# decoding one video at tokenization sizes takes seconds (an hour of 1080p: minutes); ten minutes is a hang
DEFAULT_VIDEO_TIMEOUT_S = 600.0
# decoded videos held ahead of the encoder, per worker: enough to keep every worker busy, bounded memory
PREFETCH_PER_WORKER = 4


@dataclass
class TokenizeOptions:
    # what: the videos, their labels, the clips and the tokenizer
    videos: str
    out: str
    tokenizer: str
    clip: ClipSpec | ClipShapes = field(default_factory=ClipSpec)  # ClipShapes: several lengths and sizes
    classes: str | None = None
    # how the output is split: shards of about shard_size clips; array task shard_index of num_shards
    shard_size: int = 1000
    num_shards: int = 1
    shard_index: int = 0
    # how it runs: decoding processes (0: decode in this process, unprotected: for debugging) and how long one
    # video may take in one of them before it is stopped and listed
    workers: int = 4
    video_timeout: float = DEFAULT_VIDEO_TIMEOUT_S
    batch_size: int = 16
    device: str = "cpu"
    progress: bool = True


@dataclass
class TokenizeSummary:
    videos: int = 0
    clips: int = 0
    not_videos: list[dict] = field(default_factory=list)  # files of the folder that are not videos
    failures: list[dict] = field(default_factory=list)
    skipped_groups: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        rate = self.clips / self.seconds if self.seconds else 0.0
        return (f"{self.videos} videos -> {self.clips} clips, {len(self.failures)} failed, "
                f"{len(self.not_videos)} other file(s) not taken (not videos), "
                f"{self.skipped_groups} shard(s) already done; {rate:.1f} clips/s")


def _decode(job: tuple[VideoEntry, ClipSpec | ClipShapes]) -> tuple[list, dict | None]:
    """Worker: one video -> its clips, or a failure record. Never raises: a bad video is listed."""
    entry, clip = job
    try:
        return clip.read(entry.path), None
    except ClipTooShort as exc:
        return [], {"video": entry.rel, "reason": "too_short", "detail": exc.reason}
    except VideoError as exc:
        return [], {"video": entry.rel, "reason": "unreadable", "detail": exc.reason}
    except Exception as exc:  # a decoder crash on one file must not end a day-long job
        return [], {"video": entry.rel, "reason": "error", "detail": f"{type(exc).__name__}: {exc}"}


def _lost_video(entry: VideoEntry, lost: LostJob) -> dict:
    """The failure record of a video whose decoding worker died or overran --video-timeout."""
    detail = lost.detail + (" (--video-timeout)" if lost.reason == "timeout" else "")
    return {"video": entry.rel, "reason": lost.reason, "detail": detail}


def task_groups(entries: list[VideoEntry], opts: TokenizeOptions) -> list[list[VideoEntry]]:
    """This task's share of the videos, cut into one group per shard."""
    if not 0 <= opts.shard_index < opts.num_shards:
        raise UsageError(f"--shard-index {opts.shard_index} is outside 0..{opts.num_shards - 1} (--num-shards)")
    mine = entries[opts.shard_index::opts.num_shards]
    per_video = opts.clip.clips_per_video if isinstance(opts.clip, ClipShapes) else opts.clip.per_video
    per_group = max(1, opts.shard_size // max(1, per_video))
    return [mine[i:i + per_group] for i in range(0, len(mine), per_group)]


def shard_name(task: int, group: int) -> str:
    return f"shard-t{task:03d}-{group:06d}"


def tokenize_dataset(opts: TokenizeOptions) -> TokenizeSummary:
    """Tokenize this task's share of `opts.videos` into `opts.out`; see the module docstring."""
    began = time.perf_counter()
    out = Path(opts.out)
    manifests = out / "manifests"
    manifests.mkdir(parents=True, exist_ok=True)
    record_split(out, opts.num_shards)
    listing = list_dataset(opts.videos)
    entries = listing.videos
    classes_file = opts.classes or (Path(opts.videos) / "classes.json"
                                    if (Path(opts.videos) / "classes.json").is_file() else None)
    classes = class_ids(entries, classes_file)
    if classes is not None:
        write_text_atomic(out / "classes.json", json.dumps(classes, indent=1, sort_keys=True) + "\n")
    tokenizer = load_tokenizer(opts.tokenizer, device=opts.device)
    clip = opts.clip
    grids = clip_grids(tokenizer, clip)  # checks every clip shape before any video is decoded
    for stale in out.glob(f".shard-t{opts.shard_index:03d}-*.tar.tmp*"):  # from an interrupted (killed) run
        stale.unlink()

    groups = task_groups(entries, opts)
    summary = TokenizeSummary()
    pending = []
    for g, group in enumerate(groups):
        manifest = manifests / f"{shard_name(opts.shard_index, g)}.json"
        if manifest.is_file():
            summary.skipped_groups += 1
        else:
            pending.append((g, group))
    log.info("task %d/%d: %d videos in %d shard(s), %d to do; tokenizer %s (%s), %d codes, clips %s -> %s",
             opts.shard_index, opts.num_shards, sum(len(g) for g in groups), len(groups), len(pending),
             tokenizer.name, tokenizer.version, tokenizer.codebook_size, clip.describe(),
             ", ".join(f"{shape} -> {grid}" for shape, grid in grids.items()) if len(grids) > 1 else
             next(iter(grids.values())))
    meta_common = {"fps": clip.fps, "tokenizer": tokenizer.name, "tokenizer_version": tokenizer.version}
    jobs = [(e, clip) for _, grp in pending for e in grp]
    bar = tqdm(total=len(jobs), unit="video", disable=not opts.progress, desc=f"tokenize t{opts.shard_index:03d}")
    # _decode is looked up here, at run time, so that tests/faults.py can put its faults in its place
    decoded = ((_decode(job) for job in jobs) if opts.workers == 0 else
               ordered_map(_decode, jobs, workers=opts.workers, timeout=opts.video_timeout,
                           window=PREFETCH_PER_WORKER * opts.workers))
    with closing(decoded):  # stops the workers, also when encoding or writing fails
        for g, group in pending:
            name = shard_name(opts.shard_index, g)
            record = {"videos": [e.rel for e in group], "clips": 0, "failures": []}
            writer = TokenShardWriter(out, prefix=f"shard-t{opts.shard_index:03d}", maxcount=10**9, start_index=g)
            batch: list[tuple[str, np.ndarray, int | None, dict]] = []
            with writer:
                for entry in group:
                    result = next(decoded)
                    bar.update(1)
                    clips, failure = ([], _lost_video(entry, result)) if isinstance(result, LostJob) else result
                    if failure is not None:
                        record["failures"].append(failure)
                        log.warning("skipped %s: %s", failure["video"], failure["detail"])
                        continue
                    label = classes[entry.label_name] if classes is not None and entry.label_name else None
                    for k, (start, clip) in enumerate(clips):
                        meta = {**meta_common, **clip_size_meta(clip), "source": entry.rel,
                                "clip_start": round(start, 4), "label_name": entry.label_name}
                        batch.append((sample_key(entry.rel, k), clip, label, meta))
                    if len(batch) >= opts.batch_size:
                        record["clips"] += _encode_and_write(tokenizer, batch, writer)
                        batch = []
                record["clips"] += _encode_and_write(tokenizer, batch, writer)
            # the shard has its final name (or holds nothing); now the group counts as done
            write_text_atomic(manifests / f"{name}.json", json.dumps(record, indent=1) + "\n")
            summary.videos += len(group)
            summary.clips += record["clips"]
            summary.failures += record["failures"]
    bar.close()
    summary.not_videos = listing.not_video_records(opts.shard_index, opts.num_shards)
    for record in summary.not_videos:
        log.warning("not taken: %s (%s)", record["video"], record["detail"])
    _write_failures(out, opts, summary.not_videos)
    summary.seconds = time.perf_counter() - began
    return summary


def clip_grids(tokenizer, clip: ClipSpec | ClipShapes) -> dict[str, tuple[int, int, int]]:
    """Every clip shape ``clip`` makes ("FRAMESxHxW") -> its token grid; a shape the tokenizer cannot take is
    refused (TokenizerError) by ``latent_shape``."""
    if isinstance(clip, ClipShapes):
        shapes = [(f, h, w) for f in clip.lengths for h, w in clip.sizes]
    else:
        shapes = [(clip.frames, clip.resolution, clip.resolution)]
    return {"x".join(map(str, shape)): tokenizer.latent_shape(*shape) for shape in shapes}


def clip_size_meta(frames: np.ndarray) -> dict:
    """A clip's length and size for its sample's metadata (``resolution`` the side of a square clip, else
    ``[height, width]``)."""
    n, h, w = frames.shape[:3]
    return {"frames": int(n), "resolution": int(h) if h == w else [int(h), int(w)]}


def _encode_and_write(tokenizer, batch: list, writer: TokenShardWriter) -> int:
    """Encode a batch of clips, those of one shape at a time (clips of several shapes: ClipShapes), and write them
    in the batch's order."""
    if not batch:
        return 0
    tokens: list[np.ndarray | None] = [None] * len(batch)
    by_shape: dict[tuple, list[int]] = {}
    for i, (_, clip, _, _) in enumerate(batch):
        by_shape.setdefault(clip.shape, []).append(i)
    for rows in by_shape.values():
        video = torch.from_numpy(np.stack([batch[i][1] for i in rows]))
        for i, toks in zip(rows, tokenizer.encode(video).cpu().numpy(), strict=True):
            tokens[i] = toks
    for (key, _, label, meta), toks in zip(batch, tokens, strict=True):
        writer.write(key, toks, label, meta)
    return len(batch)


def _write_failures(out: Path, opts: TokenizeOptions, not_videos: list[dict]) -> None:
    """failures.jsonl (one task) or failures-tNNN.jsonl (array tasks): this task's share of the files that are
    not videos, then every failed video of this task's shards, including those of earlier interrupted runs,
    rebuilt from the manifests."""
    rows = list(not_videos)
    for manifest in sorted((out / "manifests").glob(f"shard-t{opts.shard_index:03d}-*.json")):
        rows += json.loads(manifest.read_text())["failures"]
    name = "failures.jsonl" if opts.num_shards == 1 else f"failures-t{opts.shard_index:03d}.jsonl"
    write_text_atomic(out / name, "".join(json.dumps(r) + "\n" for r in rows))
