"""Quality over time on the synthetic world: a long video read window by window keeps its class in every window
when it does, and the table shows the window where a video turns into another class (shape, direction, colour)."""

from __future__ import annotations

import numpy as np
import pytest

from nbp_ds.eval.synthetic import render_clip
from nbp_ds.eval.windows import format_window_table, video_windows, window_consistency

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
