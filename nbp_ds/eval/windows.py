"""Quality over time: a long video read window by window (the model's clip length, e.g. 17 frames).

``window_consistency`` runs the synthetic world's consistency check (``consistency.analyze_clip``) on each
window 1..k of every video: per window, how many show their class (shape and direction), and how many keep the
shape and the colour window 1 showed. A model whose long samples drift shows it here as rates that fall with k.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from nbp_ds.eval.consistency import _names_by_id, _rate, analyze_clip
from nbp_ds.eval.synthetic import parse_class


def video_windows(frames: np.ndarray, window_frames: int) -> list[np.ndarray]:
    """Consecutive windows [k w, (k + 1) w) of a video [N, H, W, 3]; a last window shorter than w is left out."""
    if window_frames < 2:
        raise ValueError(f"window_frames must be >= 2 (a direction needs two frames), got {window_frames}")
    return [frames[k:k + window_frames] for k in range(0, len(frames) - window_frames + 1, window_frames)]


def window_consistency(videos: Iterable[np.ndarray], labels: Iterable[int],
                       class_names: Sequence[str] | Mapping[str, int], window_frames: int) -> dict[str, Any]:
    """Per window index k (1-based): {window, count, overall_rate, shape_rate, direction_rate, color_rate,
    kept_shape_rate, kept_color_rate}; ``kept_*`` count the videos whose window k reads the shape (colour) their
    window 1 read (a reading, not None). Videos are uint8 [N, H, W, 3], consumed once; labels their class ids."""
    names = _names_by_id(class_names)
    counts: list[dict[str, int]] = []
    for k, (video, label) in enumerate(zip(videos, labels, strict=True)):
        if int(label) not in names:
            raise ValueError(f"label {label} of video {k} is not a class id ({sorted(names)})")
        true_shape, true_direction = parse_class(names[int(label)])
        first: dict[str, Any] | None = None
        for w, window in enumerate(video_windows(np.asarray(video), window_frames)):
            reading = analyze_clip(window)
            first = first or reading
            if w == len(counts):
                counts.append(dict.fromkeys(("count", "overall", "shape", "direction", "color", "kept_shape",
                                             "kept_color"), 0))
            c = counts[w]
            shape_ok, direction_ok = reading["shape"] == true_shape, reading["direction"] == true_direction
            c["count"] += 1
            c["overall"] += shape_ok and direction_ok
            c["shape"] += shape_ok
            c["direction"] += direction_ok
            c["color"] += reading["color"] is not None
            c["kept_shape"] += reading["shape"] is not None and reading["shape"] == first["shape"]
            c["kept_color"] += reading["color"] is not None and reading["color"] == first["color"]
    windows = [{"window": w + 1, "count": c["count"],
                **{f"{key}_rate": _rate(c[key], c["count"])
                   for key in ("overall", "shape", "direction", "color", "kept_shape", "kept_color")}}
               for w, c in enumerate(counts)]
    return {"window_frames": window_frames, "windows": windows}


def format_window_table(result: dict[str, Any]) -> str:
    """A plain-text table of window_consistency: one row per window."""

    def pct(value: float | None) -> str:
        return "     -" if value is None else f"{100 * value:5.1f}%"

    lines = [f"window ({result['window_frames']} frames)     n    both   shape  motion  colour  kept shape  "
             f"kept colour"]
    for w in result["windows"]:
        lines.append(f"{w['window']:>6}               {w['count']:>4}  {pct(w['overall_rate'])}  "
                     f"{pct(w['shape_rate'])}  {pct(w['direction_rate'])}  {pct(w['color_rate'])}      "
                     f"{pct(w['kept_shape_rate'])}       {pct(w['kept_color_rate'])}")
    return "\n".join(lines)
