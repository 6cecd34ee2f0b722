"""Video files <-> uint8 frames through ffmpeg (ffmpeg-python builds the command lines).

Decoding resamples to a constant target fps (so variable-frame-rate sources come out evenly spaced),
scales the short side to the target resolution and center-crops a square; grayscale, odd sizes and
portrait videos all come out as RGB [N, R, R, 3]. Every failure is a `VideoError` naming the file.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".gif")


class VideoError(RuntimeError):
    """A file that cannot be used as a video; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


class ClipTooShort(VideoError):
    """The video holds fewer frames at the target fps than one clip needs."""


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float  # the container's average frame rate
    duration: float  # seconds; 0 when the container does not say


def _ffmpeg():
    try:
        import ffmpeg
    except ImportError as exc:  # pragma: no cover - a broken install
        raise VideoError("-", "the ffmpeg-python package is missing: run `make setup`") from exc
    return ffmpeg


def _rate(text: str) -> float:
    num, _, den = (text or "0/1").partition("/")
    try:
        return float(num) / float(den or 1) if float(den or 1) else 0.0
    except ValueError:
        return 0.0


def probe_video(path: str | Path) -> VideoInfo:
    """Size, frame rate and duration of a video file's first video stream."""
    ffmpeg = _ffmpeg()
    if not Path(path).is_file():
        raise VideoError(path, "no such file")
    try:
        meta = ffmpeg.probe(str(path))
    except ffmpeg.Error as exc:
        raise VideoError(path, f"not a video ffprobe can read ({_last_line(exc.stderr)})") from exc
    except FileNotFoundError as exc:
        raise VideoError(path, "ffprobe is not installed: run `make setup` (Debian package ffmpeg)") from exc
    streams = [s for s in meta.get("streams", []) if s.get("codec_type") == "video"]
    if not streams:
        raise VideoError(path, "the file has no video stream")
    s = streams[0]
    duration = float(s.get("duration") or meta.get("format", {}).get("duration") or 0.0)
    return VideoInfo(int(s["width"]), int(s["height"]), _rate(s.get("avg_frame_rate") or s.get("r_frame_rate")),
                     duration)


def _last_line(stderr: bytes | None) -> str:
    lines = (stderr or b"").decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no message"


def decode_video(path: str | Path, fps: float, resolution: int) -> np.ndarray:
    """All frames of a video at `fps`, short side scaled to `resolution` and center-cropped: uint8 [N,R,R,3]."""
    ffmpeg = _ffmpeg()
    probe_video(path)  # a clear error for missing files and non-videos before decoding
    stream = (ffmpeg.input(str(path)).video
              .filter("fps", fps=fps)
              # scale so that the short side is `resolution` (the long side overshoots), then crop the center
              .filter("scale", resolution, resolution, force_original_aspect_ratio="increase", flags="area")
              .filter("crop", resolution, resolution)
              .output("pipe:", format="rawvideo", pix_fmt="rgb24"))
    try:
        out, _ = stream.run(capture_stdout=True, capture_stderr=True, quiet=True)
    except ffmpeg.Error as exc:
        raise VideoError(path, f"ffmpeg could not decode it ({_last_line(exc.stderr)})") from exc
    frame_bytes = resolution * resolution * 3
    if len(out) % frame_bytes:
        raise VideoError(path, f"ffmpeg returned {len(out)} bytes, not a whole number of {resolution}x{resolution} "
                               f"frames")
    return np.frombuffer(out, np.uint8).reshape(-1, resolution, resolution, 3)


def clip_starts(total: int, frames: int, clips: int) -> list[int]:
    """Start frames of up to `clips` clips of `frames` frames spread evenly over `total` frames."""
    if total < frames:
        return []
    last = total - frames
    if clips <= 1 or last == 0:
        return [last // 2]
    n = min(clips, last + 1)
    return sorted({round(i * last / (n - 1)) for i in range(n)})


def read_clips_with_times(path: str | Path, frames: int, fps: float, resolution: int,
                          clips: int = 1) -> list[tuple[float, np.ndarray]]:
    """Up to `clips` evenly spaced clips of `frames` frames each, with their start time in seconds.

    One clip is taken from the middle of the video. Raises ClipTooShort when not even one clip fits.
    """
    video = decode_video(path, fps, resolution)
    starts = clip_starts(len(video), frames, clips)
    if not starts:
        raise ClipTooShort(path, f"{len(video)} frames at {fps:g} fps, a clip needs {frames}")
    return [(start / fps, video[start:start + frames]) for start in starts]


def read_clips(path: str | Path, frames: int, fps: float, resolution: int, clips: int = 1) -> list[np.ndarray]:
    """Like read_clips_with_times, without the times: a list of uint8 [frames, R, R, 3]."""
    return [clip for _, clip in read_clips_with_times(path, frames, fps, resolution, clips)]


def write_video(frames: np.ndarray, path: str | Path, fps: float = 8.0, crf: int = 18) -> None:
    """Encode uint8 frames [N, H, W, 3] as H.264 mp4 (yuv420p, playable everywhere; odd sizes padded)."""
    ffmpeg = _ffmpeg()
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{path}: expected frames [N, H, W, 3], got shape {frames.shape}")
    n, h, w, _ = frames.shape
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    process = (ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", framerate=fps)
               .filter("pad", "ceil(iw/2)*2", "ceil(ih/2)*2")  # yuv420p needs even sizes
               .output(str(path), pix_fmt="yuv420p", vcodec="libx264", crf=crf, movflags="+faststart")
               .overwrite_output()
               .run_async(pipe_stdin=True, pipe_stderr=True, quiet=True))
    try:
        _, err = process.communicate(frames.tobytes())
    except (BrokenPipeError, subprocess.SubprocessError) as exc:
        raise VideoError(path, f"ffmpeg failed while encoding: {exc}") from exc
    if process.returncode != 0:
        raise VideoError(path, f"ffmpeg could not encode {n} frames ({_last_line(err)})")
