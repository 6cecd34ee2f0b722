"""Pictures of videos: frame grids for PNG files and TensorBoard, animated GIFs for its sample videos."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def frame_grid(videos: np.ndarray, gap: int = 2) -> np.ndarray:
    """uint8 videos [B, N, H, W, 3] -> one image [B*(H+gap)-gap, N*(W+gap)-gap, 3]: a row per video."""
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"expected videos [B, N, H, W, 3], got shape {videos.shape}")
    b, n, h, w, _ = videos.shape
    grid = np.full((b * (h + gap) - gap, n * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for i in range(b):
        for j in range(n):
            grid[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = videos[i, j]
    return grid


def save_png(path: str | Path, image: np.ndarray) -> None:
    """Write an RGB uint8 image [H, W, 3] as PNG (Pillow comes with TensorBoard)."""
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(str(path))


# ---- videos for TensorBoard and W&B: animated GIFs, the given frames of frame prediction marked ------------------
GIVEN_COLOR = (0, 200, 0)  # the outline of frames given to a frame-prediction model (its context)
PREDICTED_COLOR = (230, 0, 0)  # the outline of frames the model made


def outlined(frames: np.ndarray, color: tuple[int, int, int], width: int = 1) -> np.ndarray:
    """uint8 frames [N, H, W, 3] with a ``width``-pixel outline of ``color`` drawn inside each."""
    framed = np.array(frames, dtype=np.uint8, copy=True)
    for edge in (np.s_[:, :width], np.s_[:, -width:]):
        framed[edge] = color
        framed[:, :, edge[1]] = color
    return framed


def mark_given_frames(video: np.ndarray, given: int, width: int = 1) -> np.ndarray:
    """A frame-prediction video [N, H, W, 3]: its first ``given`` frames outlined in GIVEN_COLOR, the others in
    PREDICTED_COLOR, so a viewer tells the context from the prediction."""
    return np.concatenate([outlined(video[:given], GIVEN_COLOR, width),
                           outlined(video[given:], PREDICTED_COLOR, width)])


def side_by_side(videos: list[np.ndarray], gap: int = 2) -> np.ndarray:
    """Videos of one shape [N, H, W, 3] next to each other, white between: [N, H, k*W + (k-1)*gap, 3]."""
    n, h, _, _ = videos[0].shape
    white = np.full((n, h, gap, 3), 255, dtype=np.uint8)
    parts = [part for video in videos for part in (white, np.asarray(video, dtype=np.uint8))][1:]
    return np.concatenate(parts, axis=2)


def enlarged(video: np.ndarray, min_height: int = 128) -> np.ndarray:
    """A small video [N, H, W, 3] scaled up by a whole factor (nearest pixel) to at least ``min_height`` rows:
    TensorBoard shows images at their own size, and a 32-pixel video is a smudge there."""
    factor = max(1, -(-min_height // video.shape[1]))
    return video.repeat(factor, axis=1).repeat(factor, axis=2) if factor > 1 else video


def gif_bytes(video: np.ndarray, fps: float = 8.0) -> bytes:
    """A uint8 video [N, H, W, 3] as an animated GIF that loops (what TensorBoard's image panel plays)."""
    frames = [Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8)) for frame in video]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], loop=0,
                   duration=max(20, round(1000 / fps)), optimize=False)
    return buffer.getvalue()
