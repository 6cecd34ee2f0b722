"""The quickstart's synthetic world: renderer, class-consistency checker, and the two tools around them.

The mp4 tests run the real tools (ffmpeg encode/decode) on a handful of tiny videos; the whole file takes ~15 s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nbp_ds import ffmpeg_tools
from nbp_ds.eval.consistency import analyze_clip, classify_clip, consistency_report, format_report
from nbp_ds.eval.synthetic import BACKGROUND, CLASSES, DIRECTIONS, SHAPES, SIZE_RANGE, parse_class, render_clip

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ["-m", "nbp_ds.cli.make_synthetic_videos"]
CHECKER = ["-m", "nbp_ds.cli.check_consistency"]

needs_ffmpeg = pytest.mark.skipif(not all(map(ffmpeg_tools.find_tool, ffmpeg_tools.TOOLS)),
                                  reason=f"needs ffmpeg and ffprobe: {ffmpeg_tools.INSTALL_HINT}")


def rendered(per_class: int, frames: int = 9, size: int = 32, seed: int = 0):
    """(clips, labels) with `per_class` numpy-rendered clips of every class."""
    clips, labels = [], []
    for label, name in enumerate(CLASSES):
        shape, direction = parse_class(name)
        for i in range(per_class):
            clips.append(render_clip(shape, direction, frames, size, np.random.default_rng([seed, label, i])))
            labels.append(label)
    return clips, labels


def run_tool(tool: list[str], *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *tool, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


# --------------------------------------------------------------------------------------------- the world's definition


def test_classes_are_shape_major_products():
    assert len(CLASSES) == 12 == len(SHAPES) * len(DIRECTIONS)
    assert CLASSES[0] == "square_right" and CLASSES[1] == "square_left" and CLASSES[4] == "circle_right"
    assert [parse_class(name) for name in CLASSES] == [(s, d) for s in SHAPES for d in DIRECTIONS]
    with pytest.raises(ValueError):
        parse_class("hexagon_right")


@pytest.mark.parametrize("size", [32, 64])
def test_render_clip_shape_determinism_and_stays_in_frame(size):
    for name in CLASSES:
        shape, direction = parse_class(name)
        for seed in range(5):
            clip = render_clip(shape, direction, 9, size, np.random.default_rng(seed))
            assert clip.shape == (9, size, size, 3) and clip.dtype == np.uint8
            again = render_clip(shape, direction, 9, size, np.random.default_rng(seed))
            np.testing.assert_array_equal(clip, again)
            # The object never touches the outermost ring (so it is whole, and the border is pure background).
            background = clip[0, 0, 0]
            assert np.abs(background.astype(int) - BACKGROUND).max() <= 6
            ring = np.concatenate([clip[:, 0], clip[:, -1], clip[:, :, 0], clip[:, :, -1]], axis=1)
            assert (ring == background).all(), f"{name} seed {seed} touches the border"
            # ...and it is there, with the same area in every frame up to rasterisation (it is never clipped).
            areas = (clip != background).any(-1).sum(axis=(1, 2))
            assert areas.min() > 0.3 * areas.max()
    other = render_clip("circle", "up", 9, 32, np.random.default_rng(1))
    assert not np.array_equal(other, render_clip("circle", "up", 9, 32, np.random.default_rng(2)))


def test_render_clip_long_clips_slow_down_to_stay_inside():
    clip = render_clip("square", "right", 60, 32, np.random.default_rng(0))
    background = clip[0, 0, 0]
    assert (clip[:, :, 0] == background).all() and (clip[:, :, -1] == background).all()
    with pytest.raises(ValueError):
        render_clip("hexagon", "right", 9, 32, np.random.default_rng(0))


def square_side(clip: np.ndarray) -> int:
    """The width in pixels of the object in a clip's first frame (of a square: its side, rasterised)."""
    cols = np.nonzero((clip[0] != clip[0, 0, 0]).any(-1).any(0))[0]
    return int(cols.max() - cols.min() + 1)


def test_object_size_sets_the_side_and_the_default_is_40_to_50_percent():
    # A square of side s (pixels, at any sub-pixel offset) covers the centres of s-1 to s+1 columns.
    for fraction in (0.30, 0.45, 0.60):
        for seed in range(6):
            clip = render_clip("square", "down", 9, 64, np.random.default_rng(seed), object_size=(fraction, fraction))
            assert abs(square_side(clip) - fraction * 64) <= 1, (fraction, seed)
    sides = [square_side(render_clip("square", "up", 9, 64, np.random.default_rng(seed))) for seed in range(40)]
    assert SIZE_RANGE == (0.40, 0.50)
    assert 0.40 * 64 - 1 <= min(sides) and max(sides) <= 0.50 * 64 + 1
    assert max(sides) - min(sides) >= 4  # drawn over the range, not one size
    for bad in ((0.2, 0.4), (0.5, 0.45), (0.3, 0.7), (0.4,)):
        with pytest.raises(ValueError, match=r"object size .* within \[0.3, 0.6\]"):
            render_clip("circle", "up", 9, 32, np.random.default_rng(0), object_size=bad)


# ------------------------------------------------------------------------------------------------------ the checker


def test_checker_reads_rendered_clips():
    clips, labels = rendered(per_class=5)
    report = consistency_report(clips, labels, CLASSES)
    assert report["count"] == 60
    assert report["overall_rate"] >= 0.95, format_report(report)
    assert all(stats["count"] == 5 for stats in report["per_class"].values())
    # A {name: id} mapping (classes.json) works the same as a list.
    mapped = consistency_report(clips, labels, {name: i for i, name in enumerate(CLASSES)})
    assert mapped["overall_rate"] == report["overall_rate"]


def test_checker_scores_wrong_labels_as_wrong():
    """The same well-drawn clips under wrong labels: a wrong direction or a wrong shape must fail that part of
    the check and the overall verdict, and the report's records and rates must say so consistently."""
    clips, labels = rendered(per_class=3, seed=1)
    opposite = {"right": "left", "left": "right", "down": "up", "up": "down"}
    next_shape = {shape: SHAPES[(i + 1) % len(SHAPES)] for i, shape in enumerate(SHAPES)}
    truth = [parse_class(CLASSES[label]) for label in labels]
    wrong_direction = [CLASSES.index(f"{shape}_{opposite[direction]}") for shape, direction in truth]
    wrong_shape = [CLASSES.index(f"{next_shape[shape]}_{direction}") for shape, direction in truth]
    for wrong, right_part in ((wrong_direction, "shape"), (wrong_shape, "direction")):
        report = consistency_report(clips, wrong, CLASSES)
        wrong_part = "direction" if right_part == "shape" else "shape"
        assert report["overall_rate"] <= 0.05, format_report(report)
        assert report[f"{wrong_part}_rate"] <= 0.05, format_report(report)
        assert report[f"{right_part}_rate"] >= 0.95, format_report(report)
        records = report["videos"]
        assert [r["label"] for r in records] == wrong and [r["class"] for r in records] == [CLASSES[i] for i in wrong]
        assert report["overall_rate"] == sum(r["correct"] for r in records) / len(records)
        for name, stats in report["per_class"].items():
            mine = [r for r in records if r["class"] == name]
            assert stats["count"] == len(mine) == 3
            assert stats["overall_rate"] == sum(r["correct"] for r in mine) / 3
            # what the clips labelled `name` were read as: mostly their true class, never `name` itself
            assert name not in stats["predicted"] and sum(stats["predicted"].values()) == 3


def test_analyze_clip_details():
    clip = render_clip("triangle", "left", 9, 32, np.random.default_rng(3))
    result = analyze_clip(clip)
    assert result["masks"].shape == (9, 32, 32) and result["masks"].any(axis=(1, 2)).all()
    dx, dy = result["displacement"]
    assert dx < -3 and abs(dy) < 1
    assert 0.4 < result["fill_ratio"] < 0.7
    assert classify_clip(clip) == ("triangle", "left")


def test_checker_rejects_noise_static_and_empty_clips():
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8) for _ in range(24)]
    report = consistency_report(noise, [i % 12 for i in range(24)], CLASSES)
    assert report["overall_rate"] <= 0.2, format_report(report)
    # A shape that does not move has a shape but no direction; an empty clip has neither.
    frozen = np.repeat(render_clip("square", "right", 1, 32, np.random.default_rng(0)), 9, axis=0)
    assert classify_clip(frozen) == ("square", None)
    assert classify_clip(np.full((9, 32, 32, 3), 30, np.uint8)) == (None, None)


# ------------------------------------------------------------------------------------- the tools, through real mp4s


@pytest.fixture(scope="module")
def synthetic_videos(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    result = run_tool(GENERATOR, "--out", out, "--per-class", 2, "--val-per-class", 1, "--frames", 9, "--size", 32,
                      "--fps", 8, "--seed", 0, "--workers", 2)
    assert result.returncode == 0, result.stderr
    assert "made 36 videos" in result.stdout
    return out


@needs_ffmpeg
def test_generator_layout_and_clip_length(synthetic_videos):
    from nbp_ds.video_io import decode_video, read_clips

    out = synthetic_videos
    classes = json.loads((out / "classes.json").read_text())
    assert classes == {name: i for i, name in enumerate(CLASSES)}
    for split in ("train", "val"):
        assert json.loads((out / split / "classes.json").read_text()) == classes
    assert len(list((out / "train").rglob("*.mp4"))) == 24 and len(list((out / "val").rglob("*.mp4"))) == 12
    assert not list(out.rglob(".*"))  # no temporary left behind
    path = out / "train" / "circle_up" / "circle_up_0001.mp4"
    assert path.is_file()
    # Exactly one 9-frame clip at 8 fps: the decoder neither drops nor duplicates frames.
    assert decode_video(path, 8, 32).shape == (9, 32, 32, 3)
    clip = read_clips(path, frames=9, fps=8, resolution=32)[0]
    assert classify_clip(clip) == ("circle", "up")
    # Train and val draw differently.
    val = read_clips(out / "val" / "circle_up" / "circle_up_0000.mp4", frames=9, fps=8, resolution=32)[0]
    train0 = read_clips(out / "train" / "circle_up" / "circle_up_0000.mp4", frames=9, fps=8, resolution=32)[0]
    assert not np.array_equal(val, train0)


@needs_ffmpeg
def test_checker_tool_on_ground_truth_mp4s(synthetic_videos, tmp_path):
    out = synthetic_videos
    report_path = tmp_path / "val.json"
    result = run_tool(CHECKER, "--videos", out / "val", "--classes", out / "classes.json", "--json", report_path,
                      "--min-rate", 0.95)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    assert report["count"] == 12 and report["overall_rate"] >= 0.95
    assert "overall" in result.stdout and "triangle_down" in result.stdout


@needs_ffmpeg
def test_checker_tool_on_sampler_style_folder(synthetic_videos, tmp_path):
    """Files named <class>_<NNN>.mp4 in one folder (nbp-sample's output), labels from the names."""
    samples = tmp_path / "samples"
    samples.mkdir()
    for path in sorted((synthetic_videos / "train").rglob("*_0000.mp4")):
        shutil.copy(path, samples / f"{path.parent.name}_000.mp4")
    (samples / "grid.png").write_bytes(b"")  # other sampler outputs are ignored
    # A misleading labels.npy (no decoded frames beside it) must not be used: names decide.
    np.save(samples / "labels.npy", np.zeros(12, dtype=np.int64))
    report_path = tmp_path / "samples.json"
    result = run_tool(CHECKER, samples, "--classes", synthetic_videos / "classes.json", "--json", report_path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    assert report["count"] == 12 and report["overall_rate"] >= 0.95
    assert all(stats["count"] == 1 for stats in report["per_class"].values())


def test_checker_tool_prefers_saved_frames(tmp_path):
    """Decoded frames saved beside labels.npy are read directly (no mp4 needed); labels follow the array order."""
    clips, labels = rendered(per_class=1, seed=7)
    order = np.random.default_rng(0).permutation(len(clips))
    np.save(tmp_path / "videos.npy", np.stack(clips)[order])
    np.save(tmp_path / "labels.npy", np.array(labels)[order])
    (tmp_path / "classes.json").write_text(json.dumps({name: i for i, name in enumerate(CLASSES)}))
    result = run_tool(CHECKER, tmp_path, "--json", tmp_path / "report.json", "--min-rate", 0.95)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["count"] == 12 and report["source"].endswith("videos.npy")


def test_checker_tool_usage_errors(tmp_path):
    assert run_tool(CHECKER, tmp_path).returncode == 2  # no videos at all
    (tmp_path / "classes.json").write_text(json.dumps({"dog": 0}))
    result = run_tool(CHECKER, tmp_path, "--classes", tmp_path / "classes.json")
    assert result.returncode == 2 and "dog" in result.stderr


@needs_ffmpeg
def test_checker_tool_fails_on_noise_videos(tmp_path):
    from nbp_ds.video_io import write_video

    rng = np.random.default_rng(0)
    for name in ("square_right", "triangle_up"):
        for i in range(2):
            write_video(rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8), tmp_path / name / f"{i}.mp4", fps=8)
    result = run_tool(CHECKER, "--videos", tmp_path, "--min-rate", 0.5)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "below --min-rate" in result.stderr


@needs_ffmpeg
def test_generator_records_its_world_and_refuses_to_mix_another_into_it(synthetic_videos, tmp_path):
    from nbp_ds.eval.consistency import object_mask
    from nbp_ds.video_io import read_clips

    out = synthetic_videos
    assert json.loads((out / "world.json").read_text()) == {"frames": 9, "size": 32, "fps": 8.0, "seed": 0,
                                                            "object_size": [0.40, 0.50]}
    for path in sorted((out / "train").glob("square_*/*.mp4")):  # the default size, through the mp4 round trip
        rows, cols = np.nonzero(object_mask(read_clips(path, frames=9, fps=8, resolution=32)[0][0])[0])
        assert 0.40 * 32 - 2 <= cols.max() - cols.min() + 1 <= 0.50 * 32 + 2, path
    before = sorted(p.stat().st_mtime_ns for p in out.rglob("*.mp4"))
    result = run_tool(GENERATOR, "--out", out, "--per-class", 3, "--object-size", 0.3, 0.4, "--workers", 1)
    assert result.returncode == 2
    assert f"{out} holds videos of another world" in result.stderr
    assert "object_size [0.4, 0.5] -> [0.3, 0.4]" in result.stderr
    assert sorted(p.stat().st_mtime_ns for p in out.rglob("*.mp4")) == before  # nothing made, nothing touched
    small = tmp_path / "small"
    result = run_tool(GENERATOR, "--out", small, "--per-class", 1, "--object-size", 0.3, 0.3, "--workers", 1)
    assert result.returncode == 0, result.stderr
    assert json.loads((small / "world.json").read_text())["object_size"] == [0.3, 0.3]
    frame = read_clips(small / "train" / "square_up" / "square_up_0000.mp4", frames=9, fps=8, resolution=32)[0][0]
    cols = np.nonzero(object_mask(frame)[0])[1]
    assert abs(cols.max() - cols.min() + 1 - 0.3 * 32) <= 2
    result = run_tool(GENERATOR, "--out", tmp_path / "bad", "--per-class", 1, "--object-size", 0.5, 0.7)
    assert result.returncode == 2 and "--object-size: object size [0.5, 0.7]" in result.stderr
    assert not (tmp_path / "bad").exists()


@needs_ffmpeg
def test_generator_resumes(synthetic_videos):
    out = synthetic_videos
    kept = out / "train" / "square_left" / "square_left_0000.mp4"
    redo = out / "val" / "triangle_right" / "triangle_right_0000.mp4"
    from nbp_ds.video_io import decode_video

    before_kept, before_redo = kept.stat().st_mtime_ns, decode_video(redo, 8, 32)
    redo.unlink()
    (out / "train" / "circle_left" / "circle_left_0001.mp4").write_bytes(b"")  # an empty file counts as missing
    result = run_tool(GENERATOR, "--out", out, "--per-class", 2, "--val-per-class", 1, "--workers", 1)
    assert result.returncode == 0, result.stderr
    assert "made 2 videos (34 existing kept)" in result.stdout
    assert kept.stat().st_mtime_ns == before_kept
    # The same seed gives the same video again (seeds depend on split, class and index only).
    np.testing.assert_array_equal(decode_video(redo, 8, 32), before_redo)
    assert (out / "train" / "circle_left" / "circle_left_0001.mp4").stat().st_size > 0
