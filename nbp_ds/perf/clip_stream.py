"""Memory and speed of the tokenizer trainer's clip stream (nbp_ds.tokenizer.clip_stream).

``measure`` reads one whole epoch of a video folder through a ClipLoader in this process and reports the
peak resident memory of the process and of its loader workers, and the clips per second each worker decoded.
``make_dataset`` builds a folder of ``count`` videos from a few distinct lavfi test videos (links to them, so
1,000 videos cost no disk); each link is a separate video to the stream (decoded and cached by path)."""

from __future__ import annotations

import resource
import subprocess
import time
from pathlib import Path

from nbp_ds import ffmpeg_tools
from nbp_ds.perf.proc_status import status_bytes
from nbp_ds.tokenizer.clip_stream import ClipLoader
from nbp_ds.video_io import ClipSpec, find_videos


def make_dataset(folder: Path, count: int, distinct: int = 20, seconds: float = 3.0) -> Path:
    """``folder/cNN/vNNNNN.mp4``: ``count`` videos, links to ``distinct`` 64x48 lavfi videos of ``seconds``."""
    sources = folder.parent / "sources"
    sources.mkdir(parents=True, exist_ok=True)
    patterns = ("testsrc", "testsrc2", "mandelbrot", "smptebars", "rgbtestsrc")
    for i in range(min(distinct, count)):  # no more sources than videos
        path = sources / f"s{i:03d}.mp4"
        if not path.is_file():
            subprocess.run([ffmpeg_tools.ffmpeg(), "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                            f"{patterns[i % len(patterns)]}=size=64x48:rate=8", "-t", str(seconds + i % 3),
                            str(path)], check=True)
    for i in range(count):
        link = folder / f"c{i % 10:02d}" / f"v{i:05d}.mp4"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(sources / f"s{i % distinct:03d}.mp4")
    return folder


def measure(folder: Path, workers: int, clip: ClipSpec, batch_size: int, cache_mb: int) -> dict:
    """One epoch of ``folder`` through a ClipLoader: peak RSS (MB) of this process and of its largest worker,
    clips/s overall and per worker (the first batch, worker start-up, left out of the timing)."""
    videos = find_videos(folder)
    loader = ClipLoader(videos, clip, batch_size, seed=0, rank=0, world=1, workers=workers,
                        cache_bytes=cache_mb * 2**20)
    batches = max(2, len(videos) * clip.per_video // batch_size)
    next(loader)
    began = time.perf_counter()
    for _ in range(batches - 1):
        next(loader)
    seconds = time.perf_counter() - began
    # read while they run: the workers are the fork server's children, so RUSAGE_CHILDREN never sees them
    worker_peak_mb = max((status_bytes("VmHWM", pid) / 2**20 for pid in loader.worker_pids()), default=0.0)
    loader.close()
    del loader
    clips = (batches - 1) * batch_size
    return {"videos": len(videos), "workers": workers, "cache_mb": cache_mb, "clips": clips,
            "clips_per_s": clips / seconds, "clips_per_s_per_worker": clips / seconds / max(1, workers),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_peak_rss_mb": worker_peak_mb}

