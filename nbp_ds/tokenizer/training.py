"""Pieces of tokenizer training: a decoded-clip cache, the PatchGAN discriminator and the metrics."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nbp_ds.files import atomic_output, write_text_atomic
from nbp_ds.tokenizer.dataset_listing import ListingError, list_dataset
from nbp_ds.video_io import ClipSpec, ClipTooShort, VideoError

log = logging.getLogger(__name__)


def _decode_one(args: tuple[Path, ClipSpec]) -> tuple[str, list[np.ndarray], str | None]:
    path, clip = args
    try:
        return str(path), [frames for _, frames in clip.read(path)], None
    except (ClipTooShort, VideoError) as exc:
        return str(path), [], exc.reason


def cached_clips(videos: str | Path, cache: Path, clip: ClipSpec, workers: int,
                 max_videos: int | None = None) -> np.ndarray:
    """All clips of a video folder as one uint8 array [N, frames, R, R, 3], decoded once into `cache`
    (a .npy, memory-mapped on later calls); failed videos are logged and listed in `cache`.failures.json."""
    from tqdm import tqdm

    params = {"videos": str(Path(videos).resolve()), "frames": clip.frames, "fps": clip.fps,
              "resolution": clip.resolution, "clips_per_video": clip.per_video, "max_videos": max_videos}
    meta = cache.with_suffix(".json")
    if cache.is_file() and meta.is_file() and json.loads(meta.read_text()) == params:
        return np.load(cache, mmap_mode="r")
    listing = list_dataset(videos)
    entries = listing.videos[:max_videos]
    jobs = [(e.path, clip) for e in entries]
    clips, failures = [], listing.not_video_records()
    with mp.get_context("spawn").Pool(max(1, workers)) as pool:
        for path, got, reason in tqdm(pool.imap(_decode_one, jobs, chunksize=4), total=len(jobs), unit="video",
                                      desc=f"decode {Path(videos).name}"):
            clips += got
            if reason is not None:
                failures.append({"video": path, "reason": reason})
                log.warning("skipped %s: %s", path, reason)
    if not clips:
        raise ListingError(f"--videos {videos}: no usable clips ({clip.describe()}) in {len(jobs)} videos "
                           f"(reasons: {sorted({f['reason'] for f in failures})})")
    array = np.stack(clips)
    with atomic_output(cache, suffix=".npy") as tmp:
        np.save(tmp, array)
    write_text_atomic(cache.with_suffix(".failures.json"), json.dumps(failures, indent=1))
    write_text_atomic(meta, json.dumps(params))
    return array


class PatchDiscriminator3D(nn.Module):
    """A PatchGAN over space-time patches: strided 3D convs to a grid of real/fake logits."""

    def __init__(self, channels: int = 32, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv3d(3, channels, 4, stride=(1, 2, 2), padding=1), nn.LeakyReLU(0.2)]
        c = channels
        for _ in range(layers - 1):
            mods += [nn.Conv3d(c, 2 * c, 4, stride=(1, 2, 2), padding=1), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        mods.append(nn.Conv3d(c, 1, 3, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two float videos in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.float().clamp(-1, 1), b.float().clamp(-1, 1)).item()
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)
