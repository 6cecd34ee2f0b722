"""Video files <-> uint8 frames through ffmpeg (ffmpeg-python builds the command lines): the one place
nbp_ds reads and writes videos (tokenization, tokenizer training, sampling contexts, FVD, the class
check).

Decoding for tokenization resamples to a constant target fps (so variable-frame-rate sources come out
evenly spaced), scales the short side to the target resolution and center-crops a square; grayscale,
odd sizes and portrait videos all come out as RGB [N, R, R, 3]. Evaluation reads videos as they are
(native rate and size, the first frames only). Every failure is a `VideoError` naming the file.
"""

from __future__ import annotations

import glob
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nbp_ds import ffmpeg_tools
from nbp_ds.errors import UsageError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".gif")
ARRAY_SUFFIXES = (".npy",)  # decoded frames saved by nbp-sample: uint8 [T, H, W, 3]


class VideoError(RuntimeError):
    """A file that cannot be used as a video; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


class ClipTooShort(VideoError):
    """The video holds fewer frames at the target fps than one clip needs."""


@dataclass(frozen=True)
class ClipSpec:
    """How videos are cut into clips for a tokenizer: ``per_video`` evenly spaced clips of ``frames`` frames
    at ``fps``, short side scaled to ``resolution`` and center-cropped to a square."""

    frames: int = 17
    resolution: int = 128
    fps: float = 8.0
    per_video: int = 1

    def read(self, path: str | Path) -> list[tuple[float, np.ndarray]]:
        """The clips of one video with their start times (see read_clips_with_times)."""
        return read_clips_with_times(path, self.frames, self.fps, self.resolution, self.per_video)

    def describe(self) -> str:
        return f"{self.frames}x{self.resolution}x{self.resolution} at {self.fps:g} fps"


@dataclass(frozen=True)
class ClipShapes:
    """Clips of several lengths and sizes from one dataset (for packed training): from each video, ``per_video``
    evenly spaced clips of every length in ``lengths`` that fits, all at the size bucket (height, width) of
    ``sizes`` nearest the video's aspect ratio (short side scaled to cover it, the centre cropped)."""

    lengths: tuple[int, ...]
    sizes: tuple[tuple[int, int], ...]
    fps: float = 8.0
    per_video: int = 1

    @property
    def clips_per_video(self) -> int:
        return self.per_video * len(self.lengths)

    def size_for(self, width: int, height: int) -> tuple[int, int]:
        """The size bucket (height, width) whose aspect ratio is nearest ``width / height`` (in log scale)."""
        aspect = math.log(width / height)
        return min(self.sizes, key=lambda hw: abs(math.log(hw[1] / hw[0]) - aspect))

    def read(self, path: str | Path) -> list[tuple[float, np.ndarray]]:
        """The clips of one video with their start times, every length in turn; ClipTooShort when none fits."""
        size = self.sizes[0] if len(self.sizes) == 1 else self.size_for(*_display_size(path))
        video = decode_video(path, self.fps, size)
        clips = [(start / self.fps, video[start:start + frames]) for frames in self.lengths
                 for start in clip_starts(len(video), frames, self.per_video)]
        if not clips:
            raise ClipTooShort(path, f"{len(video)} frames at {self.fps:g} fps, the shortest clip needs "
                                     f"{min(self.lengths)}")
        return clips

    def describe(self) -> str:
        sizes = ",".join(f"{h}x{w}" for h, w in self.sizes)
        return f"{','.join(map(str, self.lengths))} frames at {sizes} (nearest aspect) at {self.fps:g} fps"


def _display_size(path: str | Path) -> tuple[int, int]:
    info = probe_video(path)
    return info.width, info.height


def add_clip_arguments(parser, default_frames: int = 17, default_resolution: int = 128,
                       several: bool = False) -> None:
    """The command-line flags of a ClipSpec (--frames, --resolution, --fps, --clips-per-video); with ``several``,
    --frames and --resolution take lists (ClipShapes: clips of several lengths and sizes)."""
    if several:
        parser.add_argument("--frames", default=str(default_frames),
                            help=f"frames per clip, 1 + 4k; several, comma-separated (17,33), give clips of every "
                                 f"length that fits (default {default_frames})")
        parser.add_argument("--resolution", default=str(default_resolution),
                            help=f"clip size in pixels: a square side (128) or HEIGHTxWIDTH (128x224); several, "
                                 f"comma-separated, are size buckets: each video takes the one nearest its aspect "
                                 f"ratio (default {default_resolution})")
    else:
        parser.add_argument("--frames", type=int, default=default_frames,
                            help=f"frames per clip, 1 + 4k (default {default_frames})")
        parser.add_argument("--resolution", type=int, default=default_resolution,
                            help=f"square clip side in pixels (default {default_resolution})")
    parser.add_argument("--fps", type=float, default=8.0, help="frame rate clips are resampled to (default 8)")
    parser.add_argument("--clips-per-video", type=int, default=1, help="evenly spaced clips per video (default 1)")


def clip_from_arguments(args) -> ClipSpec | ClipShapes:
    """The ClipSpec of parsed add_clip_arguments flags (ClipShapes when they name several lengths or sizes, or a
    size that is not square), refused by name when a value cannot work."""
    lengths = _positive_ints(args.frames, "--frames")
    sizes = _sizes(args.resolution)
    if args.clips_per_video < 1:
        raise UsageError(f"--clips-per-video must be >= 1, got {args.clips_per_video}")
    if args.fps <= 0:
        raise UsageError(f"--fps must be > 0, got {args.fps}")
    if len(lengths) == 1 and len(sizes) == 1 and sizes[0][0] == sizes[0][1]:
        return ClipSpec(lengths[0], sizes[0][0], args.fps, args.clips_per_video)
    return ClipShapes(lengths, sizes, args.fps, args.clips_per_video)


def _positive_ints(value: int | str, flag: str) -> tuple[int, ...]:
    try:
        numbers = tuple(int(v) for v in str(value).split(","))
    except ValueError:
        raise UsageError(f"{flag} takes whole numbers, comma-separated, got {value!r}") from None
    if any(n < 1 for n in numbers):
        raise UsageError(f"{flag} must be >= 1, got {value}")
    if len(set(numbers)) != len(numbers):
        raise UsageError(f"{flag} names a value twice: {value}")
    return numbers


def _sizes(value: int | str) -> tuple[tuple[int, int], ...]:
    """--resolution: 128 (square) or 128x224 (height x width), comma-separated."""
    sizes = []
    for part in str(value).split(","):
        sides = _positive_ints(part.replace("x", ",", 1), "--resolution") if "x" in part else \
            _positive_ints(part, "--resolution") * 2
        if len(sides) != 2:
            raise UsageError(f"--resolution takes a side (128) or HEIGHTxWIDTH (128x224), got {part!r}")
        sizes.append(sides)
    if len(set(sizes)) != len(sizes):
        raise UsageError(f"--resolution names a size twice: {value}")
    return tuple(sizes)


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float  # the container's average frame rate
    duration: float  # seconds; 0 when the container does not say


def _ffmpeg():
    try:
        import ffmpeg  # local: a broken install is reported as a VideoError
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
    _check_exists(path)
    try:
        meta = ffmpeg.probe(str(path), cmd=ffmpeg_tools.ffprobe())
    except ffmpeg.Error as exc:
        raise VideoError(path, f"not a video ffprobe can read ({_last_line(exc.stderr)})") from exc
    except FileNotFoundError as exc:  # ToolMissing, or a program that vanished since it was found
        raise VideoError(path, str(exc)) from exc
    streams = [s for s in meta.get("streams", []) if s.get("codec_type") == "video"]
    if not streams:
        raise VideoError(path, "the file has no video stream")
    s = streams[0]
    duration = float(s.get("duration") or meta.get("format", {}).get("duration") or 0.0)
    return VideoInfo(int(s["width"]), int(s["height"]), _rate(s.get("avg_frame_rate") or s.get("r_frame_rate")),
                     duration)


def _check_exists(path: str | Path) -> None:
    """Refuse a missing path or a folder. Anything else is handed to ffmpeg, also what is not a regular file (a
    named pipe, a device): its reads may never return, like those of a file on a hung network file system, and
    only the caller can bound that (tokenization's --video-timeout)."""
    if Path(path).is_dir():
        raise VideoError(path, "a folder, not a video file")
    if not Path(path).exists():
        raise VideoError(path, "no such file")


def _last_line(stderr: bytes | None) -> str:
    lines = (stderr or b"").decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no message"


def decode_video(path: str | Path, fps: float | None = None, resolution: int | tuple[int, int] | None = None,
                 max_frames: int | None = None) -> np.ndarray:
    """Frames of a video as uint8 [N, H, W, 3]: resampled to ``fps`` (None: as stored), short side scaled to
    ``resolution`` and center-cropped to a square, or, for ``(height, width)``, scaled to cover that size and
    center-cropped to it (None: the stored size, not rotated by display metadata), the first ``max_frames`` only
    (None: all; decoding stops there)."""
    ffmpeg = _ffmpeg()
    _check_exists(path)
    # the stored size needs the probe; a target size does not, and one ffmpeg process per video instead of
    # two is what tokenizing a large dataset pays (the probe still explains a failure below)
    info = probe_video(path) if resolution is None else None
    # at the stored size, frames must not be turned by rotation metadata: the probe reports the coded size
    stream = ffmpeg.input(str(path), **({"noautorotate": None} if resolution is None else {})).video
    if fps is not None:
        stream = stream.filter("fps", fps=fps)
    if resolution is not None:
        target_h, target_w = (resolution, resolution) if isinstance(resolution, int) else resolution
        # scale so that the frame covers the target (one side overshoots), then crop the center
        stream = (stream.filter("scale", target_w, target_h, force_original_aspect_ratio="increase", flags="area")
                  .filter("crop", target_w, target_h))
    height, width = (target_h, target_w) if info is None else (info.height, info.width)
    limit = {"frames:v": max_frames} if max_frames is not None else {}
    try:
        out, _ = stream.output("pipe:", format="rawvideo", pix_fmt="rgb24", **limit).run(
            cmd=ffmpeg_tools.ffmpeg(), capture_stdout=True, capture_stderr=True, quiet=True)
    except FileNotFoundError as exc:
        raise VideoError(path, str(exc)) from exc
    except ffmpeg.Error as exc:
        probe_video(path)  # not a video, or no video stream: the probe names what is wrong
        raise VideoError(path, f"ffmpeg could not decode it ({_last_line(exc.stderr)})") from exc
    frame_bytes = height * width * 3
    if len(out) % frame_bytes:
        raise VideoError(path, f"ffmpeg returned {len(out)} bytes, not a whole number of {width}x{height} frames")
    return np.frombuffer(out, np.uint8).reshape(-1, height, width, 3)


def read_frames(path: str | Path, max_frames: int | None = None) -> np.ndarray:
    """The first frames of a video file, or of a saved uint8 array [T, H, W, 3] (``.npy``), as they are."""
    path = Path(path)
    if path.suffix.lower() in ARRAY_SUFFIXES:
        video = np.load(path, mmap_mode="r")  # only the frames used are read from disk
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise VideoError(path, f"expected a uint8 array [T, H, W, 3], got {video.dtype} {video.shape}")
        return np.array(video[:max_frames])
    return decode_video(path, max_frames=max_frames)


def find_videos(spec: str | Path, suffixes: tuple[str, ...] = VIDEO_SUFFIXES) -> list[Path]:
    """Files named by ``spec`` with one of ``suffixes``, sorted: a folder (searched recursively, hidden files
    left out), one file, or a glob pattern (``**`` allowed)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = [p for p in path.rglob("*") if not p.name.startswith(".")]
    elif path.is_file():
        return [path]
    else:
        files = [Path(p) for p in glob.glob(str(path), recursive=True)]
    return sorted(p for p in files if p.is_file() and p.suffix.lower() in suffixes)


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
    try:
        program = ffmpeg_tools.ffmpeg()
    except FileNotFoundError as exc:
        raise VideoError(path, str(exc)) from exc
    process = (ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", framerate=fps)
               .filter("pad", "ceil(iw/2)*2", "ceil(ih/2)*2")  # yuv420p needs even sizes
               .output(str(path), pix_fmt="yuv420p", vcodec="libx264", crf=crf, movflags="+faststart")
               .overwrite_output()
               .run_async(cmd=program, pipe_stdin=True, pipe_stderr=True, quiet=True))
    try:
        _, err = process.communicate(frames.tobytes())
    except (BrokenPipeError, subprocess.SubprocessError) as exc:
        raise VideoError(path, f"ffmpeg failed while encoding: {exc}") from exc
    if process.returncode != 0:
        raise VideoError(path, f"ffmpeg could not encode {n} frames ({_last_line(err)})")
