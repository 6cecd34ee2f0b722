"""Pieces of tokenizer training: the held-out clips, the PatchGAN discriminator and the metrics."""

from __future__ import annotations

import json
import logging
from contextlib import closing
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nbp_ds.files import atomic_output, write_text_atomic
from nbp_ds.tokenizer.dataset_listing import ListingError
from nbp_ds.video_io import ClipSpec, ClipTooShort, VideoError
from nbp_ds.worker_pool import LostJob, ordered_map

log = logging.getLogger(__name__)

PREFETCH_PER_WORKER = 2  # held-out videos decoded ahead of the one being collected, per worker


def _decode_one(args: tuple[Path, ClipSpec]) -> tuple[list[np.ndarray], str | None]:
    path, clip = args
    try:
        return [frames for _, frames in clip.read(path)], None
    except (ClipTooShort, VideoError) as exc:
        return [], exc.reason


def cached_clips(paths: list[Path], cache: Path, clip: ClipSpec, workers: int,
                 timeout: float) -> tuple[np.ndarray, list[dict]]:
    """The middle clip of each of ``paths`` as one uint8 array [N, frames, R, R, 3] (the held-out clips: a small
    set, so decoded once into ``cache``, a .npy memory-mapped on later calls), and the videos that gave none
    ({video, reason}). Decoding runs in ``workers`` processes of nbp_ds.worker_pool (0: in this one), so a
    decoder that crashes or runs past ``timeout`` seconds costs its video only (reason worker_died / timeout)."""
    params = {"videos": [str(p) for p in paths], "frames": clip.frames, "fps": clip.fps,
              "resolution": clip.resolution}
    meta, failures_file = cache.with_suffix(".json"), cache.with_suffix(".failures.json")
    if cache.is_file() and meta.is_file() and json.loads(meta.read_text()) == params:
        return np.load(cache, mmap_mode="r"), json.loads(failures_file.read_text())
    one_clip = ClipSpec(clip.frames, clip.resolution, clip.fps, 1)
    clips, failures = [], []
    jobs = [(p, one_clip) for p in paths]
    decoded = ((_decode_one(job) for job in jobs) if workers == 0 else
               ordered_map(_decode_one, jobs, workers=min(workers, len(jobs)) or 1, timeout=timeout,
                           window=PREFETCH_PER_WORKER * workers))
    with closing(decoded):
        for path, result in tqdm(zip(paths, decoded, strict=True), total=len(paths), unit="video",
                                 desc=f"decode {cache.stem}"):
            got, reason = ([], f"{result.reason}: {result.detail}") if isinstance(result, LostJob) else result
            clips += got
            if reason is not None:
                failures.append({"video": str(path), "reason": reason})
                log.warning("skipped %s: %s", path, reason)
    if not clips:
        raise ListingError(f"no usable held-out clips ({clip.describe()}) in {len(paths)} videos "
                           f"(reasons: {sorted({f['reason'] for f in failures})}); name held-out videos with "
                           f"--val-videos")
    array = np.stack(clips)
    with atomic_output(cache, suffix=".npy") as tmp:
        np.save(tmp, array)
    write_text_atomic(failures_file, json.dumps(failures, indent=1))
    write_text_atomic(meta, json.dumps(params))
    return array, failures


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


class LeCam:
    """LeCAM regularisation of the discriminator (Tseng et al. 2021, used by MAGVIT-v2): with a_r, a_f moving
    averages (``decay``) of the mean logits on real and on reconstructed clips,
    ``R = mean(relu(D(real) - a_f)^2) + mean(relu(a_r - D(fake))^2)``, added to the discriminator's loss.
    The averages start at the first batch's means and are part of the run's saved state."""

    def __init__(self, decay: float = 0.999):
        self.decay = decay
        self.real: float | None = None
        self.fake: float | None = None

    def penalty(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        """R for this batch; then the averages take the batch in (first batch: they become its means)."""
        real_mean, fake_mean = float(real_logits.detach().mean()), float(fake_logits.detach().mean())
        if self.real is None:
            self.real, self.fake = real_mean, fake_mean
        penalty = (F.relu(real_logits - self.fake).pow(2).mean() + F.relu(self.real - fake_logits).pow(2).mean())
        self.real = self.decay * self.real + (1 - self.decay) * real_mean
        self.fake = self.decay * self.fake + (1 - self.decay) * fake_mean
        return penalty

    def state_dict(self) -> dict:
        return {"decay": self.decay, "real": self.real, "fake": self.fake}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.real, self.fake = state["decay"], state["real"], state["fake"]


def adaptive_generator_weight(reconstruction_loss: torch.Tensor, generator_loss: torch.Tensor,
                              last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's adaptive weight of the generator's GAN loss (used by MAGVIT-v2): the ratio of the gradient norms
    the reconstruction and the GAN losses give the decoder's last layer,
    ``||d L_rec / d w|| / (||d L_gan / d w|| + 1e-4)``, clamped to [0, max_weight], without gradient."""
    rec = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    gan = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    return (rec.norm() / (gan.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian window, C1 = 0.01^2, C2 = 0.03^2 on a [0, 1] scale) between two float
    videos [B, 3, N, H, W] in [-1, 1], over every channel of every frame; windows lie inside the frame."""
    h, w = a.shape[-2:]
    size = min(window, h, w)
    size -= 1 - size % 2  # odd: the window has a center
    x, y = (((v.float().clamp(-1, 1) + 1) / 2).reshape(-1, 1, h, w) for v in (a, b))
    g = torch.exp(-((torch.arange(size, dtype=torch.float32, device=x.device) - size // 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :])[None, None]
    mean_x, mean_y = F.conv2d(x, kernel), F.conv2d(y, kernel)
    var_x = F.conv2d(x * x, kernel) - mean_x ** 2
    var_y = F.conv2d(y * y, kernel) - mean_y ** 2
    cov = F.conv2d(x * y, kernel) - mean_x * mean_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    score = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / ((mean_x ** 2 + mean_y ** 2 + c1) * (var_x + var_y + c2))
    return float(score.mean())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two float videos in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.float().clamp(-1, 1), b.float().clamp(-1, 1)).item()
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)
