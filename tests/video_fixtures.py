"""Small real video files made with ffmpeg's lavfi sources, for the video and tokenization tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

from nbp_ds import ffmpeg_tools


def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_tools.ffmpeg(), "-loglevel", "error", "-y", *args], check=True)


def lavfi_video(path: Path, size: str = "64x48", rate: int = 8, seconds: float = 3.0, source: str = "testsrc",
            extra: tuple[str, ...] = ()) -> Path:
    """A moving test pattern (testsrc's counter and sweep change every frame)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ffmpeg("-f", "lavfi", "-i", f"{source}=size={size}:rate={rate}", "-t", str(seconds), *extra, str(path))
    return path


def three_bands(path: Path, vertical: bool = False, seconds: float = 2.0) -> Path:
    """Red | green | blue 48x48 squares side by side (or stacked): a center crop must be all green."""
    stack = "vstack=inputs=3" if vertical else "hstack=inputs=3"
    args = []
    for color in ("red", "green", "blue"):
        args += ["-f", "lavfi", "-i", f"color={color}:size=48x48:rate=8"]
    ffmpeg(*args, "-filter_complex", stack, "-t", str(seconds), "-pix_fmt", "yuv444p", str(path))
    return path


def dataset(root: Path, classes: int = 2, per_class: int = 3, seconds: float = 3.0) -> Path:
    """root/<class>/vNN.mp4 videos with different patterns, plus a broken file and a too-short video."""
    sources = ("testsrc", "testsrc2", "smptebars", "rgbtestsrc", "mandelbrot", "yuvtestsrc")
    for c in range(classes):
        for i in range(per_class):
            lavfi_video(root / f"class{c}" / f"v{i:02d}.mp4", size="64x48", seconds=seconds,
                    source=sources[(c * per_class + i) % len(sources)])
    (root / "class0" / "broken.mp4").write_bytes(b"this is not a video")
    lavfi_video(root / "class1" / "short.mp4", seconds=0.5)
    return root
