"""Video decoding and encoding through real ffmpeg on files made by ffmpeg's lavfi sources."""

from __future__ import annotations

import numpy as np
import pytest
from video_fixtures import ffmpeg, lavfi_video, three_bands

from nbp_ds.video_io import (
    ClipTooShort,
    VideoError,
    clip_starts,
    decode_video,
    probe_video,
    read_clips,
    read_clips_with_times,
    write_video,
)


def test_clips_have_shape_fps_and_spacing(tmp_path):
    path = lavfi_video(tmp_path / "a.mp4", size="64x48", rate=25, seconds=2.0)
    info = probe_video(path)
    assert (info.width, info.height, info.fps) == (64, 48, 25.0) and info.duration == pytest.approx(2.0, abs=0.05)
    assert decode_video(path, fps=8, resolution=32).shape == (16, 32, 32, 3)  # 2 s resampled to 8 fps
    clips = read_clips_with_times(path, frames=9, fps=8, resolution=32, clips=2)
    assert [t for t, _ in clips] == [0.0, 7 / 8]
    assert all(c.shape == (9, 32, 32, 3) and c.dtype == np.uint8 for _, c in clips)
    assert not np.array_equal(clips[0][1][0], clips[0][1][1])  # the pattern moves


@pytest.mark.parametrize("vertical", [False, True], ids=["landscape", "portrait"])
def test_short_side_scaled_and_center_cropped(tmp_path, vertical):
    path = three_bands(tmp_path / "bands.mp4", vertical=vertical)
    (clip,) = read_clips(path, frames=9, fps=8, resolution=32)
    mean = clip[:, 4:-4, 4:-4].reshape(-1, 3).mean(0)  # away from the chroma-blurred edges
    assert mean[1] > 100 and mean[0] < 20 and mean[2] < 20, mean  # all green (ffmpeg green is 0,128,0)


def test_odd_size_grayscale_and_variable_frame_rate(tmp_path):
    odd = lavfi_video(tmp_path / "odd.mkv", size="63x47", extra=("-c:v", "ffv1"))
    assert read_clips(odd, frames=9, fps=8, resolution=32)[0].shape == (9, 32, 32, 3)
    gray = lavfi_video(tmp_path / "gray.mkv", extra=("-pix_fmt", "gray", "-c:v", "ffv1"))
    clip = read_clips(gray, frames=9, fps=8, resolution=32)[0]
    assert np.array_equal(clip[..., 0], clip[..., 1]) and np.array_equal(clip[..., 1], clip[..., 2])
    # keep 2 frames of every 3 at irregular times: a variable-frame-rate file of 2 s
    vfr = lavfi_video(tmp_path / "vfr.mp4", rate=30, seconds=2.0,
                  extra=("-vf", "select='not(eq(mod(n\\,3)\\,1))'", "-fps_mode", "vfr"))
    assert abs(len(decode_video(vfr, fps=8, resolution=32)) - 16) <= 1


def test_bad_files_name_the_file(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("hello")
    with pytest.raises(VideoError, match="notes.mp4"):
        read_clips(text, frames=9, fps=8, resolution=32)
    with pytest.raises(VideoError, match="missing.mp4: no such file"):
        probe_video(tmp_path / "missing.mp4")
    audio = tmp_path / "tone.m4a"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440", "-t", "1", str(audio))
    with pytest.raises(VideoError, match="tone.m4a: the file has no video stream"):
        read_clips(audio, frames=9, fps=8, resolution=32)
    short = lavfi_video(tmp_path / "short.mp4", seconds=0.5)
    with pytest.raises(ClipTooShort, match="short.mp4: 4 frames at 8 fps, a clip needs 9"):
        read_clips(short, frames=9, fps=8, resolution=32)


def test_clip_starts():
    assert clip_starts(8, 9, 1) == []
    assert clip_starts(9, 9, 3) == [0]
    assert clip_starts(20, 9, 1) == [5]
    assert clip_starts(20, 9, 3) == [0, 6, 11]


def test_write_video_round_trip(tmp_path):
    frames = np.zeros((9, 31, 33, 3), np.uint8)
    frames[:, :, :, 0] = np.linspace(0, 255, 9, dtype=np.uint8)[:, None, None]  # red ramps up over time
    write_video(frames, tmp_path / "out" / "v.mp4", fps=8)
    info = probe_video(tmp_path / "out" / "v.mp4")
    assert (info.width, info.height) == (34, 32)  # padded to even sizes for yuv420p
    back = decode_video(tmp_path / "out" / "v.mp4", fps=8, resolution=32)
    assert len(back) == 9
    red = back[..., 0].reshape(9, -1).mean(1)
    assert np.all(np.diff(red) > 0) and abs(red[-1] - 255) < 20
