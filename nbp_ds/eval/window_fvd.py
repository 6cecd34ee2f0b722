"""FVD over time: long generated videos read window by window, one FVD per window index.

Window k (1-based) of a video is its frames [(k - 1) w, k w) (``windows.video_windows``: consecutive, a last
window shorter than w left out); the detector embeds the first ``num_frames`` frames of each window, as FVD
embeds the first frames of a clip. FVD k is the distance between the real clips' features and the features of
window k of every video long enough to have one. Window 1 is the clip FVD reads without windows, so FVD 1 is the
ordinary FVD; a model whose long samples drift away from the data shows FVDs that grow with k.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nbp_ds.eval.fvd import I3DFeatureExtractor, ShortVideoError, fvd_from_features
from nbp_ds.eval.windows import video_windows
from nbp_ds.video_io import read_frames

logger = logging.getLogger(__name__)


def window_features(extractor: I3DFeatureExtractor, files: Sequence[Path], window_frames: int,
                    skip_short: bool = False, skipped: list[Path] | None = None, limit: int | None = None,
                    progress: bool = False) -> list[np.ndarray]:
    """Detector features of every window of every video: a list over window index k of [n_k, D] arrays.

    Videos are read one at a time (whole, then cut into windows); a video with no full window raises
    ShortVideoError, or with ``skip_short`` goes to ``skipped`` and the next one takes its place. ``limit``
    caps the number of videos used."""
    if window_frames < extractor.num_frames:
        raise ValueError(f"windows of {window_frames} frames are shorter than the {extractor.num_frames} frames "
                         f"the detector embeds")
    per_window: list[list[np.ndarray]] = []
    used = 0
    bar = None
    if progress:
        from tqdm import tqdm  # imported lazily, as in fvd.py: only the CLI shows progress bars

        bar = tqdm(total=min(len(files), limit or len(files)), desc="I3D windows", unit="video")
    try:
        for path in files:
            if limit is not None and used >= limit:
                break
            windows = video_windows(read_frames(path), window_frames)
            if not windows:
                error = ShortVideoError(f"{path}: shorter than one window of {window_frames} frames (--skip-short "
                                        f"leaves such videos out)")
                if not skip_short:
                    raise error
                logger.warning("skipping %s", error)
                if skipped is not None:
                    skipped.append(path)
                continue
            # one detector call for the video's windows; its clips come back in window order
            feats = extractor.features([w[:extractor.num_frames] for w in windows])
            for k, row in enumerate(feats):
                if k == len(per_window):
                    per_window.append([])
                per_window[k].append(row)
            used += 1
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return [np.stack(rows) for rows in per_window]


def window_fvds(real: np.ndarray, per_window: Sequence[np.ndarray]) -> list[dict]:
    """One record per window index: {"window" (1-based), "num_fake", "fvd"}; ``fvd`` is None for a window that
    fewer than 2 videos reach (a covariance needs 2)."""
    return [{"window": k + 1, "num_fake": int(feats.shape[0]),
             "fvd": fvd_from_features(real, feats) if feats.shape[0] >= 2 else None}
            for k, feats in enumerate(per_window)]


def format_window_fvds(windows: Sequence[dict], window_frames: int) -> str:
    """A plain-text table: one row per window (its frames, the videos that reach it, its FVD)."""
    lines = ["window   frames       videos   FVD"]
    for w in windows:
        start = (w["window"] - 1) * window_frames
        fvd = "-" if w["fvd"] is None else f"{w['fvd']:.4f}"
        lines.append(f"{w['window']:>6}   {start:>5}-{start + window_frames - 1:<5}  {w['num_fake']:>6}   {fvd}")
    return "\n".join(lines)
