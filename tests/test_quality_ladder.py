"""The quality ladder: the checker's colour reading, Wilson intervals, and the rungs (source, reconstruction,
samples) computed from videos whose answers are known."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from nbp_ds.eval.consistency import COLOR_TOLERANCE, analyze_clip, color_name, consistency_report
from nbp_ds.eval.quality import format_ladder, ladder_scalars, quality_ladder, wilson_interval
from nbp_ds.eval.synthetic import BACKGROUND, CLASSES, COLOR_NAMES, OBJECT_COLORS, parse_class, render_clip

CLASS_IDS = {name: i for i, name in enumerate(CLASSES)}


def rendered(per_class: int, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    clips, labels = [], []
    for label, name in enumerate(CLASSES):
        shape, direction = parse_class(name)
        for i in range(per_class):
            clips.append(render_clip(shape, direction, 9, 32, np.random.default_rng([seed, label, i])))
            labels.append(label)
    return np.stack(clips), labels


def drawn_color(clip: np.ndarray) -> str:
    """The palette name of the most common pixel value of the first frame that is not the background's (read
    independently of the checker: the renderer paints the object in one exact palette colour)."""
    pixels = [tuple(int(v) for v in p) for p in clip[0].reshape(-1, 3)]
    background = Counter(pixels).most_common(1)[0][0]
    colour = Counter(p for p in pixels if p != background).most_common(1)[0][0]
    return COLOR_NAMES[OBJECT_COLORS.index(colour)]


def test_wilson_interval_matches_published_values_and_edges():
    # 8/10 at 95%: (0.4902, 0.9433), the textbook example (Newcombe 1998, method 3)
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    # 0 of n: the lower end is 0 and the upper z^2 / (n + z^2); n of n mirrors it
    z2 = 1.959963984540054 ** 2
    assert wilson_interval(0, 20) == pytest.approx((0.0, z2 / (20 + z2)))
    assert wilson_interval(0, 48)[0] == 0.0 and wilson_interval(48, 48)[1] == 1.0  # exactly: 0 <= rate <= 1
    assert wilson_interval(20, 20) == pytest.approx((20 / (20 + z2), 1.0))
    low, high = wilson_interval(48, 96)
    assert low < 0.5 < high and high - low < 0.21  # narrows with the count
    with pytest.raises(ValueError):
        wilson_interval(3, 0)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_color_names_of_the_palette_and_of_grey():
    assert 38 < COLOR_TOLERANCE < 39  # half of yellow-orange, the closest pair (~77)
    for name, rgb in zip(COLOR_NAMES, OBJECT_COLORS, strict=True):
        assert color_name(rgb) == name
        assert color_name(np.array(rgb) + [20, -20, 10]) == name  # 30 away: still nearest and within tolerance
    assert color_name((140, 140, 140)) is None  # what a tokenizer that loses colour draws
    assert color_name(BACKGROUND) is None
    assert color_name((np.nan, 0, 0)) is None


def test_checker_reads_each_rendered_objects_colour_and_none_when_it_changes_or_fades():
    clips, _ = rendered(2)
    for clip in clips:
        assert analyze_clip(clip)["color"] == drawn_color(clip)
    clip = clips[0].copy()
    mask = analyze_clip(clip)["masks"][-1]
    others = [rgb for name, rgb in zip(COLOR_NAMES, OBJECT_COLORS, strict=True) if name != drawn_color(clip)]
    clip[-1][mask] = others[0]  # the last frame's object repainted: colour not kept
    assert analyze_clip(clip)["color"] is None
    coloured = next(c for c in clips[1:] if drawn_color(c) != "white")  # white stays white in grey
    grey = np.repeat(coloured.mean(axis=-1, keepdims=True), 3, axis=-1).round().astype(np.uint8)
    assert analyze_clip(grey)["shape"] is not None and analyze_clip(grey)["color"] is None


class IdentityTokenizer:
    """A stand-in tokenizer whose reconstruction is the clip itself, its grey version, or the clip with every
    palette colour painted as the next one (a colour kept, but the wrong one)."""

    def __init__(self, grey: bool = False, recolour: bool = False):
        self.grey, self.recolour = grey, recolour

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return video

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.grey:
            return tokens.float().mean(dim=-1, keepdim=True).expand_as(tokens).round().to(torch.uint8)
        if self.recolour:
            out = tokens.clone()
            for i, rgb in enumerate(OBJECT_COLORS):
                painted = (tokens == torch.tensor(rgb, dtype=torch.uint8)).all(dim=-1)
                out[painted] = torch.tensor(OBJECT_COLORS[(i + 1) % len(OBJECT_COLORS)], dtype=torch.uint8)
            return out
        return tokens


def test_ladder_rungs_count_what_the_checker_reads():
    clips, labels = rendered(3)
    exact = quality_ladder(clips, labels, CLASS_IDS, IdentityTokenizer(), list(clips[::-1]), labels[::-1])
    for rung in ("source", "reconstruction", "samples"):
        assert exact[rung]["count"] == 36
        assert exact[rung]["color"]["rate"] == 1.0 and exact[rung]["shape"]["rate"] >= 0.95
    assert exact["reconstruction"]["psnr"] == float("inf") and exact["reconstruction"]["ssim"] == pytest.approx(1)
    assert exact["reconstruction"]["color_error_rgb"] == [0.0, 0.0, 0.0]

    grey = quality_ladder(clips, labels, CLASS_IDS, IdentityTokenizer(grey=True))
    rung = grey["reconstruction"]
    whites = sum(drawn_color(c) == "white" for c in clips)  # grey keeps white, and only white
    assert 0 < whites < 12 and rung["color"]["hits"] == whites
    assert rung["color"]["high"] < 0.5  # most colours lost, and the interval says so
    assert rung["direction"]["rate"] >= 0.95  # grey objects still move
    # the per-channel error over the object's pixels: |channel - mean of the three|, computed here directly
    masks = [analyze_clip(c)["masks"] for c in clips]
    pixels = np.concatenate([c[m].astype(float) for c, m in zip(clips, masks, strict=True)])
    expected = np.abs(pixels - np.round(pixels.mean(axis=1, keepdims=True))).mean(axis=0)
    assert rung["color_error_rgb"] == pytest.approx(expected, abs=0.5)
    assert rung["psnr"] < 40 and "samples" not in grey

    # every object in another palette colour: the checker reads a colour, but not its source's
    recoloured = quality_ladder(clips, labels, CLASS_IDS, IdentityTokenizer(recolour=True))["reconstruction"]
    assert recoloured["color"]["hits"] == 0 and recoloured["shape"]["rate"] >= 0.95

    # samples of the wrong class: shape or direction fail; their colour still counts (a class has none)
    wrong = [(label + 1) % 12 for label in labels]
    report = quality_ladder(clips, labels, CLASS_IDS, samples=list(clips), sample_labels=wrong)["samples"]
    assert report["direction"]["rate"] <= 0.05 and report["overall"]["rate"] <= 0.05
    assert report["color"]["rate"] == 1.0
    table = format_ladder(exact)
    assert all(name in table for name in ("source", "reconstruction", "samples"))
    assert ladder_scalars(grey)["quality/reconstruction/color"] == pytest.approx(whites / 36)


def test_report_colour_against_reference_colours():
    clips, labels = rendered(1)
    truth = [drawn_color(c) for c in clips]
    assert consistency_report(iter(clips), labels, CLASSES, reference_colors=truth)["color_rate"] == 1.0
    shifted = truth[1:] + truth[:1]
    differs = sum(a != b for a, b in zip(truth, shifted, strict=True))
    rate = consistency_report(iter(clips), labels, CLASSES, reference_colors=shifted)["color_rate"]
    assert rate == pytest.approx(1 - differs / len(clips))
