"""Pictures of videos: frame grids for PNG files and TensorBoard."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(str(path))
