"""Does a video show its class? A model-free reader of the synthetic moving-shapes world (``synthetic.py``).

For each frame the object is the set of pixels far (in RGB distance) from the background colour, the background
being the per-channel median of the frame's border (the synthetic object never touches the border). Only the largest
8-connected blob is kept, so stray speckles of a generated video do not drag the centroid around. Then

* direction: the least-squares slope of the blob's centroid over the frames, times the clip length, gives the total
  displacement; its dominant axis and sign name the direction (None when it moves less than ``min_motion`` pixels);
* shape: two cues of the blob, each a median over frames: the fill ratio (blob area / bounding-box area; square 1.0,
  circle pi/4, triangle 0.5) and the top fraction (share of the area in the upper half of the bounding box; 1/2 for
  square and circle, 1/4 for the upward triangle). The shape whose ideal pair (``synthetic.FILL_RATIOS``,
  ``synthetic.TOP_FRACTIONS``) is nearest wins. The fill ratio alone separates the ideal shapes, but rasterised at
  32x32 a small circle (down to ~0.67) and a small triangle (up to ~0.63) come close; the top fraction keeps them
  apart. Both cues survive blur: a blurred square loses its corner pixels but still fills ~0.95 of its box.

* colour: the median RGB of the blob's pixels in each frame, named by the nearest colour of the palette
  (``synthetic.OBJECT_COLORS``) when it lies within ``COLOR_TOLERANCE`` of it. The clip's colour is that name when
  the first and the last frame holding an object read the same one (an object that changes colour, or fades to
  grey, has none). A class has no colour (it is drawn at random per video), so a sample's colour counts as read
  when it has one; a reconstruction's when it is its source's.

A clip in which no frame holds a plausible object (nothing far from the background, or "objects" covering more than
half the frame, as in noise) gets neither a shape nor a direction.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from nbp_ds.eval.synthetic import COLOR_NAMES, FILL_RATIOS, OBJECT_COLORS, SHAPES, TOP_FRACTIONS, parse_class

logger = logging.getLogger(__name__)

# Pixels closer than this to the background (RGB distance, 0..441) are never object, whatever the frame's contrast:
# keeps codec noise and faint generated blotches out of the mask.
MIN_DISTANCE = 40.0
# The per-frame threshold is this fraction of the object's contrast (a high percentile of the distances), i.e. the
# midpoint between background and object colour, so blurred mp4 edges split evenly between inside and outside.
CONTRAST_FRACTION = 0.5
# Percentile of a frame's distances taken as the object's contrast: robust to a few outlier pixels, yet inside the
# smallest object (a triangle 30% of the side across covers ~4.5% of the frame, i.e. 9 times 0.5%).
CONTRAST_PERCENTILE = 99.5
# Blobs smaller than this many pixels, or covering more than this fraction of the frame, are not objects.
MIN_AREA = 4
MAX_AREA_FRACTION = 0.5
# Total displacement (pixels over the clip) below which the object counts as not moving.
MIN_MOTION = 0.5
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_PALETTE = np.array(OBJECT_COLORS, dtype=np.float32)
# Half the smallest distance between two palette colours (yellow and orange, ~77): a colour within it of a palette
# colour is nearer to that one than to any other, so no reading is ambiguous; grey (the palette's mean is 134+ away
# from every colour) reads as none.
COLOR_TOLERANCE = 0.5 * min(float(np.linalg.norm(a - b)) for i, a in enumerate(_PALETTE) for b in _PALETTE[i + 1:])


def border_background(frame: np.ndarray) -> np.ndarray:
    """Per-channel median of the outermost ring of pixels of one frame [H, W, 3] -> float [3]."""
    ring = np.concatenate([frame[0], frame[-1], frame[1:-1, 0], frame[1:-1, -1]], axis=0)
    return np.median(ring.astype(np.float32), axis=0)


def object_mask(frame: np.ndarray, min_distance: float = MIN_DISTANCE) -> tuple[np.ndarray, np.ndarray]:
    """The object's boolean mask [H, W] in one uint8 frame [H, W, 3] (largest blob far from the background).

    Returns (mask, background colour). The mask is empty when no blob qualifies as an object.
    """
    background = border_background(frame)
    distance = np.linalg.norm(frame.astype(np.float32) - background, axis=-1)
    contrast = float(np.percentile(distance, CONTRAST_PERCENTILE))
    threshold = max(min_distance, CONTRAST_FRACTION * contrast)
    candidates = distance > threshold
    empty = np.zeros(candidates.shape, dtype=bool)
    if not candidates.any():
        return empty, background
    labelled, _ = ndimage.label(candidates, structure=_EIGHT_CONNECTED)
    sizes = np.bincount(labelled.ravel())[1:]
    biggest = int(np.argmax(sizes))
    area = int(sizes[biggest])
    if area < MIN_AREA or area > MAX_AREA_FRACTION * candidates.size:
        return empty, background
    return labelled == biggest + 1, background


def fill_ratio(mask: np.ndarray) -> float:
    """Mask area / area of its axis-aligned bounding box (nan for an empty mask)."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return float("nan")
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    return float(rows.size / box)


def top_fraction(mask: np.ndarray) -> float:
    """Share of the mask's area in the upper half of its bounding box (a middle row counts half; nan if empty)."""
    rows = np.nonzero(mask)[0]
    if rows.size == 0:
        return float("nan")
    middle = (rows.min() + rows.max()) / 2
    return float(((rows < middle).sum() + 0.5 * (rows == middle).sum()) / rows.size)


def shape_from_features(ratio: float | None, top: float | None = None) -> str | None:
    """The shape whose ideal (fill ratio, top fraction) is nearest (Euclidean) to the measured pair.

    Without ``top`` only the fill ratio decides. None when the fill ratio is None/nan (no object).
    """
    if ratio is None or not np.isfinite(ratio):
        return None
    if top is None or not np.isfinite(top):
        return min(SHAPES, key=lambda s: abs(FILL_RATIOS[s] - ratio))
    return min(SHAPES, key=lambda s: np.hypot(FILL_RATIOS[s] - ratio, TOP_FRACTIONS[s] - top))


def color_name(rgb: np.ndarray | Sequence[float]) -> str | None:
    """The palette colour (``synthetic.COLOR_NAMES``) within COLOR_TOLERANCE of an RGB triple; None if none is."""
    rgb = np.asarray(rgb, dtype=np.float32)
    if not np.all(np.isfinite(rgb)):
        return None
    distances = np.linalg.norm(_PALETTE - rgb, axis=-1)
    nearest = int(np.argmin(distances))
    return COLOR_NAMES[nearest] if distances[nearest] <= COLOR_TOLERANCE else None


def direction_from_displacement(dx: float, dy: float, min_motion: float = MIN_MOTION) -> str | None:
    """The direction of the dominant axis of a displacement (image coordinates, y down); None if too small."""
    if max(abs(dx), abs(dy)) < min_motion:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def analyze_clip(frames: np.ndarray, min_motion: float = MIN_MOTION) -> dict[str, Any]:
    """Find the object in every frame of a uint8 clip [N, H, W, 3] and read its shape and direction of motion.

    Returns a dict with
      masks [N, H, W] bool, background [N, 3], areas [N], centroids [N, 2] (x, y in pixels; nan where no object),
      fill_ratios [N] (nan where no object), fill_ratio (median, or None), top_fractions [N], top_fraction
      (median, or None), displacement ((dx, dy) total over the clip from a least-squares fit of the centroids, or
      None with fewer than two object frames), shape (str or None), direction (str or None), colors [N, 3] (median
      RGB of the object, nan where no object), color (palette name kept from the first object frame to the last, or
      None).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [N, H, W, 3], got shape {frames.shape}")
    if frames.dtype != np.uint8:
        # Generated frames may come as floats in [0, 255]; the thresholds are in uint8 units.
        frames = np.clip(np.rint(frames), 0, 255).astype(np.uint8)
    n, h, w, _ = frames.shape
    masks = np.zeros((n, h, w), dtype=bool)
    backgrounds = np.zeros((n, 3), dtype=np.float32)
    centroids = np.full((n, 2), np.nan)
    ratios = np.full(n, np.nan)
    tops = np.full(n, np.nan)
    colors = np.full((n, 3), np.nan, dtype=np.float32)
    for t in range(n):
        masks[t], backgrounds[t] = object_mask(frames[t])
        rows, cols = np.nonzero(masks[t])
        if rows.size:
            # Pixel centres, to match the renderer's geometry (pixel j spans [j, j + 1)).
            centroids[t] = (cols.mean() + 0.5, rows.mean() + 0.5)
            ratios[t] = fill_ratio(masks[t])
            tops[t] = top_fraction(masks[t])
            colors[t] = np.median(frames[t][masks[t]].astype(np.float32), axis=0)
    valid = np.isfinite(centroids[:, 0])
    ratio = float(np.median(ratios[valid])) if valid.any() else None
    top = float(np.median(tops[valid])) if valid.any() else None

    color = None
    if valid.any():
        first, last = (color_name(colors[i]) for i in np.nonzero(valid)[0][[0, -1]])
        color = first if first == last else None
    displacement = None
    direction = None
    if valid.sum() >= 2:
        # A least-squares slope uses every frame, so one badly segmented frame (first or last) cannot flip the
        # direction the way a last-minus-first difference could.
        t = np.nonzero(valid)[0].astype(np.float64)
        span = t[-1] - t[0]
        slope_x = np.polyfit(t, centroids[valid, 0], 1)[0]
        slope_y = np.polyfit(t, centroids[valid, 1], 1)[0]
        displacement = (float(slope_x * span), float(slope_y * span))
        direction = direction_from_displacement(*displacement, min_motion=min_motion)
    return {
        "masks": masks,
        "background": backgrounds,
        "areas": masks.sum(axis=(1, 2)),
        "centroids": centroids,
        "fill_ratios": ratios,
        "fill_ratio": ratio,
        "top_fractions": tops,
        "top_fraction": top,
        "displacement": displacement,
        "shape": shape_from_features(ratio, top),
        "direction": direction,
        "colors": colors,
        "color": color,
    }


def classify_clip(frames: np.ndarray) -> tuple[str | None, str | None]:
    """(shape, direction) read from a uint8 clip [N, H, W, 3]; either is None when it cannot be told."""
    result = analyze_clip(frames)
    return result["shape"], result["direction"]


def _rate(hits: int, count: int) -> float | None:
    return hits / count if count else None


def _names_by_id(class_names: Sequence[str] | Mapping[str, int]) -> dict[int, str]:
    if isinstance(class_names, Mapping):
        return {int(i): str(name) for name, i in class_names.items()}
    return dict(enumerate(class_names))


def consistency_report(videos: Iterable[np.ndarray], labels: Iterable[int],
                       class_names: Sequence[str] | Mapping[str, int],
                       ids: Sequence[str] | None = None,
                       reference_colors: Sequence[str | None] | None = None) -> dict[str, Any]:
    """How many videos show their class: overall (shape and direction both right), shape, direction and colour rates.

    ``videos`` are uint8 clips [N, H, W, 3] (any iterable, consumed once), ``labels`` their class ids,
    ``class_names`` the class names by id (a sequence) or a {name: id} mapping like classes.json; every name must be
    a synthetic ``<shape>_<direction>`` class. ``ids`` optionally names each video (e.g. its file) in the per-video
    records. ``reference_colors`` optionally gives each video the colour it must show (a reconstruction: its
    source's reading); without it a video's colour counts as read when the checker names one (kept from the first
    frame to the last). Returns {count, overall_rate, shape_rate, direction_rate, color_rate, hits: {shape,
    direction, color, overall}, per_class: {name: {count, overall_rate, shape_rate, direction_rate, color_rate,
    predicted: {predicted class: count}}}, videos: [per-video records]}; rates are None where there is nothing to
    count.
    """
    names = _names_by_id(class_names)
    truth = {i: parse_class(name) for i, name in names.items()}
    per_class = {names[i]: {"count": 0, "overall": 0, "shape": 0, "direction": 0, "color": 0, "predicted": {}}
                 for i in sorted(names)}
    records = []
    for k, (video, label) in enumerate(zip(videos, labels, strict=True)):
        label = int(label)
        if label not in names:
            raise ValueError(f"label {label} of video {k} is not a class id ({sorted(names)})")
        true_shape, true_direction = truth[label]
        reading = analyze_clip(video)
        shape, direction, color = reading["shape"], reading["direction"], reading["color"]
        shape_ok, direction_ok = shape == true_shape, direction == true_direction
        color_ok = color is not None and (reference_colors is None or color == reference_colors[k])
        predicted = f"{shape or '?'}_{direction or '?'}"
        stats = per_class[names[label]]
        stats["count"] += 1
        stats["shape"] += shape_ok
        stats["direction"] += direction_ok
        stats["color"] += color_ok
        stats["overall"] += shape_ok and direction_ok
        stats["predicted"][predicted] = stats["predicted"].get(predicted, 0) + 1
        records.append({"id": ids[k] if ids is not None else k, "label": label, "class": names[label],
                        "shape": shape, "direction": direction, "color": color, "color_ok": bool(color_ok),
                        "correct": bool(shape_ok and direction_ok)})
    total = len(records)
    hits = {key: sum(s[key] for s in per_class.values()) for key in ("shape", "direction", "color", "overall")}
    report: dict[str, Any] = {
        "count": total,
        "overall_rate": _rate(hits["overall"], total),
        "shape_rate": _rate(hits["shape"], total),
        "direction_rate": _rate(hits["direction"], total),
        "color_rate": _rate(hits["color"], total),
        "hits": hits,
        "per_class": {name: {"count": s["count"], "overall_rate": _rate(s["overall"], s["count"]),
                             "shape_rate": _rate(s["shape"], s["count"]),
                             "direction_rate": _rate(s["direction"], s["count"]),
                             "color_rate": _rate(s["color"], s["count"]),
                             "predicted": dict(sorted(s["predicted"].items()))}
                      for name, s in per_class.items()},
        "videos": records,
    }
    logger.debug("consistency over %d videos: overall %s", total, report["overall_rate"])
    return report


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of a consistency_report: one row per class, then the overall rates."""

    def pct(value: float | None) -> str:
        return "     -" if value is None else f"{100 * value:5.1f}%"

    width = max([len("class")] + [len(name) for name in report["per_class"]])
    lines = [f"{'class':<{width}}  {'n':>4}  {'both':>6}  {'shape':>6}  {'motion':>6}  {'colour':>6}  predicted as"]
    for name, s in report["per_class"].items():
        predicted = ", ".join(f"{p} x{c}" for p, c in s["predicted"].items())
        lines.append(f"{name:<{width}}  {s['count']:>4}  {pct(s['overall_rate'])}  {pct(s['shape_rate'])}  "
                     f"{pct(s['direction_rate'])}  {pct(s['color_rate'])}  {predicted}")
    lines.append(f"{'all':<{width}}  {report['count']:>4}  {pct(report['overall_rate'])}  {pct(report['shape_rate'])}"
                 f"  {pct(report['direction_rate'])}  {pct(report['color_rate'])}")
    return "\n".join(lines)


__all__ = [
    "analyze_clip",
    "classify_clip",
    "color_name",
    "consistency_report",
    "direction_from_displacement",
    "fill_ratio",
    "format_report",
    "object_mask",
    "shape_from_features",
    "top_fraction",
]
