"""Fréchet Video Distance (FVD) with the StyleGAN-V I3D protocol.

FVD (Unterthiner et al., 2018) is the Fréchet distance between two Gaussians fitted to I3D features of real and
generated clips. Numbers are only comparable across papers when the whole pipeline matches, so this module pins it
to the protocol used by StyleGAN-V (Skorokhodov et al., 2022) and, following it, by the NBP paper (arXiv 2502.07737):

* Detector: StyleGAN-V's ``i3d_torchscript.pt``, a TorchScript port of the TF-Hub I3D (Kinetics-400) that the
  original TensorFlow FVD code uses. Features are the 400 pre-softmax logits (``return_features=True``).
* Clips: the first 16 frames of every video (no temporal subsampling), as StyleGAN-V takes generated clips.
  (StyleGAN-V samples the 16 real frames at a random offset by default; cut real videos beforehand to mimic that.)
* Preprocessing (done here, outside the detector): frames are resized to 224x224 with bilinear interpolation
  (no antialiasing), scaled from [0, 255] to [-1, 1] and laid out as [B, 3, T, H, W]; the detector is then called as
  ``detector(x, rescale=False, resize=False, return_features=True)``. This is what StyleGAN-V's authors use in
  ``universome/fvd-comparison`` to show the port matches the TF implementation. StyleGAN-V's training-time metric
  instead hands the detector uint8 clips with ``rescale=True, resize=True`` and lets it do the same two steps
  internally; both are the TF FVD preprocessing (resize, then ``2 * x / 255 - 1``).
* Statistics: mean and unbiased covariance (``np.cov``, ddof=1, as TF-GAN's Fréchet distance). StyleGAN-V's
  ``FeatureStats`` divides by N instead; with the usual 2048 clips the two differ by a factor 2048/2047 on the
  covariance, far below run-to-run noise.

The detector cannot be downloaded from this environment (no network): fetch it elsewhere and pass its path.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from nbp_ds.video_io import read_frames

logger = logging.getLogger(__name__)

I3D_FILENAME = "i3d_torchscript.pt"
# Where StyleGAN-V's code fetches the detector from; quoted in the error message so users know what to download.
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"
I3D_RESOLUTION = 224
I3D_FEATURE_DIM = 400
DEFAULT_NUM_FRAMES = 16

VideoBatch = np.ndarray | torch.Tensor


def missing_detector_message(path: str | os.PathLike | None) -> str:
    """The message shown when the I3D TorchScript detector is not at ``path`` (also used by ``nbp-eval-fvd``)."""
    where = f"not found at '{path}'" if path else "not given"
    return (
        f"I3D detector {where}. It cannot be downloaded here (this environment has no network access). "
        f"FVD needs StyleGAN-V's '{I3D_FILENAME}', the publicly released I3D Kinetics-400 TorchScript detector "
        f"(a port of the TF-Hub I3D used by the original FVD code; StyleGAN-V fetches it from {I3D_URL}). "
        f"Download it on a machine with internet, copy it to this machine and pass --i3d PATH."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Fréchet distance between Gaussians
# ---------------------------------------------------------------------------------------------------------------------


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``d^2 = |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})``, computed in float64.

    Raises:
        ValueError: on mismatched shapes, or when the matrix square root has a large imaginary part (the inputs are
            then not valid covariance matrices, e.g. not positive semi-definite).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be 1-D vectors of the same length, got {mu1.shape} and {mu2.shape}")
    dim = mu1.shape[0]
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(f"covariances must be {dim}x{dim} to match the means, got {sigma1.shape} and {sigma2.shape}")

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # With fewer samples than feature dimensions (e.g. < 400 clips for I3D) the sample covariances are
        # rank-deficient, so sigma1 @ sigma2 is singular and the Schur-based sqrtm can return inf/nan. A tiny ridge
        # eps*I on both covariances makes the product well conditioned (the fix used by the standard FID code); it
        # shifts the distance by only O(eps * dim).
        logger.warning("Fréchet distance: singular covariance product; adding %g to the diagonals", eps)
        offset = np.eye(dim) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))

    if np.iscomplexobj(covmean):
        # sqrtm of a product of two PSD matrices is real in exact arithmetic (its eigenvalues are real and >= 0);
        # round-off can leave tiny imaginary parts, which are dropped. A large one means the inputs are not PSD.
        # The tolerance is relative to the feature scale so large-variance features are not rejected for noise.
        imag = float(np.abs(np.diagonal(covmean).imag).max())
        scale = max(1.0, float(np.abs(np.diagonal(covmean).real).max()))
        if imag > 1e-3 * scale:
            raise ValueError(
                f"Fréchet distance: matrix square root has a large imaginary component ({imag:.3g}); "
                "the covariances are probably not positive semi-definite"
            )
        covmean = covmean.real

    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of ``features`` [N, D]."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(f"features must be a 2-D array [N, D], got shape {feats.shape}")
    if feats.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors to estimate a covariance, got {feats.shape[0]}")
    if not np.isfinite(feats).all():
        # A NaN would silently turn the whole FVD into NaN; say where it comes from instead.
        raise ValueError("features contain NaN or Inf (check the detector and its inputs)")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def fvd_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """FVD between two sets of detector features, [N_real, D] and [N_fake, D]."""
    real = np.asarray(real)
    fake = np.asarray(fake)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with the same D, got {real.shape} and {fake.shape}")
    for name, n in (("real", real.shape[0]), ("fake", fake.shape[0])):
        if n < real.shape[1]:
            # Not an error (small smoke runs are useful), but the number is not comparable to published FVDs.
            logger.warning("FVD: only %d %s clips for %d-D features; the covariance is rank-deficient and the "
                           "score is biased (StyleGAN-V uses 2048 clips per set)", n, name, real.shape[1])
    mu_r, sigma_r = gaussian_stats(real)
    mu_f, sigma_f = gaussian_stats(fake)
    return frechet_distance(mu_r, sigma_r, mu_f, sigma_f)


# ---------------------------------------------------------------------------------------------------------------------
# Clip preprocessing and the I3D detector
# ---------------------------------------------------------------------------------------------------------------------


def preprocess_clips(
    videos: VideoBatch,
    num_frames: int = DEFAULT_NUM_FRAMES,
    device: str | torch.device | None = None,
    resolution: int = I3D_RESOLUTION,
) -> torch.Tensor:
    """Turn uint8 videos [B, T, H, W, 3] into the I3D input: float32 [B, 3, num_frames, 224, 224] in [-1, 1].

    Takes the first ``num_frames`` frames, resizes each frame bilinearly (``align_corners=False``, no antialiasing,
    like TF's ``resize_bilinear`` in the original FVD code) and maps [0, 255] to [-1, 1].
    ``device`` is where the work happens (default: where ``videos`` already is; CPU for numpy input).
    """
    x = torch.from_numpy(np.ascontiguousarray(videos)) if isinstance(videos, np.ndarray) else videos
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"videos must be a numpy array or torch tensor, got {type(videos).__name__}")
    if x.dtype != torch.uint8:
        raise TypeError(f"videos must be uint8 in [0, 255], got {x.dtype}")
    if x.ndim != 5 or x.shape[-1] != 3:
        raise ValueError(f"videos must be [B, T, H, W, 3] (RGB, channels last), got shape {tuple(x.shape)}")
    b, t, h, w, _ = x.shape
    if t < num_frames:
        raise ValueError(f"FVD clips need at least {num_frames} frames, got videos with only {t} frames")

    # Slice before converting so only the frames that are used get copied and cast.
    x = x[:, :num_frames]
    if device is not None:
        x = x.to(device)
    frames = x.reshape(b * num_frames, h, w, 3).permute(0, 3, 1, 2).float()  # [B*T, 3, H, W]
    if (h, w) != (resolution, resolution):
        frames = F.interpolate(frames, size=(resolution, resolution), mode="bilinear", align_corners=False)
    # [0, 255] -> [-1, 1] (the TF FVD code's 2 * x / 255 - 1). Bilinear weights are convex, so the result is in
    # [-1, 1] up to float32 rounding of the weights; the clamp only removes that ulp-sized overshoot.
    frames = (frames / 127.5 - 1.0).clamp_(-1.0, 1.0)
    return frames.reshape(b, num_frames, 3, resolution, resolution).permute(0, 2, 1, 3, 4).contiguous()


@contextlib.contextmanager
def _full_fp32_precision() -> Iterator[None]:
    """Disable TF32 inside the block (restoring the caller's flags after).

    StyleGAN-V's metric scripts switch TF32 off (``allow_tf32 = False`` for matmul and cuDNN), so its I3D features are
    full FP32; PyTorch enables TF32 for cuDNN convolutions by default, which would run I3D with ~10-bit mantissas on
    Ampere and newer GPUs and perturb the features.
    """
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class I3DFeatureExtractor:
    """I3D (Kinetics-400) features of video clips with StyleGAN-V's TorchScript detector.

    Args:
        path: the detector file, StyleGAN-V's ``i3d_torchscript.pt``.
        device: where to run it (``"cuda"`` is much faster; CPU works for small sets).
        num_frames: frames per clip (16 in the StyleGAN-V / NBP protocol).
        batch_size: clips per detector call.

    Raises:
        FileNotFoundError: if ``path`` is not a file; the message says how to get it.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        num_frames: int = DEFAULT_NUM_FRAMES,
        batch_size: int = 16,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(missing_detector_message(path))
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.num_frames = num_frames
        self.batch_size = batch_size
        self.detector = torch.jit.load(str(self.path), map_location=self.device).eval()

    @torch.no_grad()
    def _run(self, clips: torch.Tensor) -> np.ndarray:
        """Detector features for preprocessed clips [b, 3, T, 224, 224]."""
        with _full_fp32_precision():
            out = self.detector(clips.to(self.device), rescale=False, resize=False, return_features=True)
        if out.ndim != 2 or out.shape[0] != clips.shape[0]:
            raise RuntimeError(f"detector returned shape {tuple(out.shape)} for {clips.shape[0]} clips; "
                               f"expected [{clips.shape[0]}, {I3D_FEATURE_DIM}] (is this {I3D_FILENAME}?)")
        return out.double().cpu().numpy()

    def _batches(self, videos: VideoBatch | Iterable[VideoBatch], batch_size: int) -> Iterator[torch.Tensor]:
        """Preprocessed batches from one [B, T, H, W, 3] array or from an iterable of [T, H, W, 3] clips."""
        if isinstance(videos, np.ndarray | torch.Tensor):
            if videos.ndim != 5:
                raise ValueError(f"videos must be [B, T, H, W, 3], got shape {tuple(videos.shape)} "
                                 "(wrap a single clip as clip[None])")
            for start in range(0, videos.shape[0], batch_size):
                yield preprocess_clips(videos[start:start + batch_size], self.num_frames, self.device)
            return
        # Clips of a list may differ in size, so each is resized on its own before they are stacked.
        pending: list[torch.Tensor] = []
        for clip in videos:
            if clip.ndim != 4:
                raise ValueError(f"each clip must be [T, H, W, 3], got shape {tuple(clip.shape)}")
            pending.append(preprocess_clips(clip[None], self.num_frames, self.device))
            if len(pending) == batch_size:
                yield torch.cat(pending)
                pending = []
        if pending:
            yield torch.cat(pending)

    def features(
        self,
        videos: VideoBatch | Iterable[VideoBatch],
        batch_size: int | None = None,
        desc: str | None = None,
        total: int | None = None,
    ) -> np.ndarray:
        """I3D features [N, 400] (float64) of uint8 videos.

        ``videos`` is either one array/tensor [N, T, H, W, 3] or an iterable of [T, H, W, 3] clips (possibly of
        different sizes, e.g. a generator decoding files one by one, so only one batch is held in memory).
        ``desc`` turns on a tqdm progress bar (``total``: number of clips, if known).
        """
        batch_size = batch_size or self.batch_size
        if total is None and isinstance(videos, np.ndarray | torch.Tensor | Sequence):
            total = len(videos)
        bar = None
        if desc is not None:
            from tqdm import tqdm  # imported lazily: only the CLI shows progress bars

            bar = tqdm(total=total, desc=desc, unit="clip")
        feats: list[np.ndarray] = []
        try:
            for batch in self._batches(videos, batch_size):
                feats.append(self._run(batch))
                if bar is not None:
                    bar.update(batch.shape[0])
        finally:
            if bar is not None:
                bar.close()
        if not feats:
            raise ValueError("no videos given to the feature extractor")
        return np.concatenate(feats)


def compute_fvd(
    real_videos: VideoBatch | Iterable[VideoBatch],
    fake_videos: VideoBatch | Iterable[VideoBatch],
    extractor: I3DFeatureExtractor,
    batch_size: int | None = None,
) -> float:
    """FVD between real and generated uint8 videos ([N, T, H, W, 3] arrays or iterables of [T, H, W, 3] clips)."""
    real = extractor.features(real_videos, batch_size=batch_size)
    fake = extractor.features(fake_videos, batch_size=batch_size)
    return fvd_from_features(real, fake)


class ShortVideoError(ValueError):
    """A video has fewer frames than a clip needs."""


def load_clip(path: Path, num_frames: int) -> np.ndarray:
    """The first ``num_frames`` frames of a video file or a saved ``.npy`` array, uint8 [num_frames, H, W, 3]."""
    clip = read_frames(path, num_frames)
    if clip.shape[0] < num_frames:
        raise ShortVideoError(f"{path}: has {clip.shape[0]} frames, FVD clips need {num_frames}")
    return clip


def iter_clips(files: Sequence[Path], num_frames: int, skip_short: bool, skipped: list[Path],
               limit: int | None = None) -> Iterator[np.ndarray]:
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
