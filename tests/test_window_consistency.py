"""Quality over time on the synthetic world: a long video read window by window keeps its class in every window
when it does, and the table shows the window where a video turns into another class (shape, direction, colour)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nbp_ds.eval.synthetic import render_clip
from nbp_ds.eval.windows import format_window_table, video_windows, window_consistency
from nbp_ds.generate.folder import RecordLog, VideoJob, VideoWriter

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["square_right", "circle_down", "triangle_left"]


def long_video(shape: str, direction: str, frames: int, seed: int) -> np.ndarray:
    return render_clip(shape, direction, frames, 32, np.random.default_rng(seed))


def test_windows_split_a_video_in_order():
    video = np.arange(40)[:, None, None, None] * np.ones((1, 2, 2, 3), dtype=np.int64)
    windows = video_windows(video, 9)
    assert [int(w[0, 0, 0, 0]) for w in windows] == [0, 9, 18, 27] and all(len(w) == 9 for w in windows)
    with pytest.raises(ValueError, match="window_frames must be >= 2"):
        video_windows(video, 1)


def test_a_video_that_keeps_its_class_reads_it_in_every_window_and_a_changed_one_does_not():
    kept = [long_video("square", "right", 27, 1), long_video("circle", "down", 27, 2)]
    # the third video turns from a square moving right into a triangle moving left (another colour) at window 3
    changed = np.concatenate([long_video("square", "right", 27, 3)[:18], long_video("triangle", "left", 9, 4)])
    result = window_consistency([*kept, changed], [0, 1, 0], CLASSES, window_frames=9)
    rates = [(w["overall_rate"], w["kept_shape_rate"]) for w in result["windows"]]
    assert [w["count"] for w in result["windows"]] == [3, 3, 3]
    assert rates[0] == (1.0, 1.0) and rates[1] == (1.0, 1.0)
    assert rates[2] == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert result["windows"][2]["kept_color_rate"] <= 2 / 3
    table = format_window_table(result)
    assert len(table.splitlines()) == 4 and "66.7%" in table.splitlines()[3]


def test_nbp_check_consistency_window_frames_reads_a_sampler_folder_window_by_window(tmp_path):
    """nbp-check-consistency --window-frames 9 on a folder as nbp-sample --frames 27 leaves it (record and frames
    arrays): the table printed and in the JSON has the rates of the videos above, window by window."""
    kept = [long_video("square", "right", 27, 1), long_video("circle", "down", 27, 2)]
    changed = np.concatenate([long_video("square", "right", 27, 3)[:18], long_video("triangle", "left", 9, 4)])
    log = RecordLog(tmp_path / "videos.jsonl")
    writer = VideoWriter(tmp_path, log, fps=8.0, mp4=False, workers=1, max_pending=3)
    for index, (video, label) in enumerate(zip([*kept, changed], [0, 1, 0], strict=True)):
        writer.submit(VideoJob(index, label, f"{CLASSES[label]}_{index:03d}"), np.zeros((7, 8, 8)), video)
    writer.close()
    log.close()
    (tmp_path / "classes.json").write_text(json.dumps({name: i for i, name in enumerate(CLASSES)}))
    result = subprocess.run([sys.executable, "-m", "nbp_ds.cli.check_consistency", str(tmp_path), "--window-frames",
                             "9", "--json", str(tmp_path / "c.json")], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    windows = json.loads((tmp_path / "c.json").read_text())["window_consistency"]["windows"]
    assert [w["count"] for w in windows] == [3, 3, 3]
    assert [(w["overall_rate"], w["kept_shape_rate"]) for w in windows][:2] == [(1.0, 1.0), (1.0, 1.0)]
    assert windows[2]["overall_rate"] == pytest.approx(2 / 3) == windows[2]["kept_shape_rate"]
    assert "66.7%" in result.stdout.splitlines()[-1]  # the table's last row: window 3


@pytest.mark.parametrize("folder", ["samples", "videos"])
def test_nbp_check_consistency_window_frames_reads_mp4_files_window_by_window(tmp_path, folder):
    """The same three videos as mp4 files (through the H.264 encoder and ffmpeg's decoder): a sample folder of
    <class>_<NNN>.mp4 without a record, and --videos, a folder of class subfolders (ground truth)."""
    from nbp_ds.video_io import write_video

    kept = [long_video("square", "right", 27, 1), long_video("circle", "down", 27, 2)]
    changed = np.concatenate([long_video("square", "right", 27, 3)[:18], long_video("triangle", "left", 9, 4)])
    for index, (video, label) in enumerate(zip([*kept, changed], [0, 1, 0], strict=True)):
        name = f"{CLASSES[label]}_{index:03d}.mp4"
        write_video(video, tmp_path / "in" / (name if folder == "samples" else f"{CLASSES[label]}/{name}"))
    (tmp_path / "classes.json").write_text(json.dumps({name: i for i, name in enumerate(CLASSES)}))
    where = [str(tmp_path / "in")] if folder == "samples" else ["--videos", str(tmp_path / "in")]
    result = subprocess.run([sys.executable, "-m", "nbp_ds.cli.check_consistency", *where, "--window-frames", "9",
                             "--classes", str(tmp_path / "classes.json"), "--json", str(tmp_path / "c.json")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    windows = json.loads((tmp_path / "c.json").read_text())["window_consistency"]["windows"]
    assert [w["count"] for w in windows] == [3, 3, 3]
    assert [(w["overall_rate"], w["kept_shape_rate"]) for w in windows][:2] == [(1.0, 1.0), (1.0, 1.0)]
    assert windows[2]["overall_rate"] == pytest.approx(2 / 3) == windows[2]["kept_shape_rate"]
    assert "66.7%" in result.stdout.splitlines()[-1]
