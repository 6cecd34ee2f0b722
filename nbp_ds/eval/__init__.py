"""Evaluation metrics for generated videos (FVD)."""

from nbp_ds.eval.fvd import (
    I3D_FEATURE_DIM,
    I3D_FILENAME,
    I3D_RESOLUTION,
    I3DFeatureExtractor,
    compute_fvd,
    frechet_distance,
    fvd_from_features,
    gaussian_stats,
    missing_detector_message,
    preprocess_clips,
)

__all__ = [
    "I3D_FEATURE_DIM",
    "I3D_FILENAME",
    "I3D_RESOLUTION",
    "I3DFeatureExtractor",
    "compute_fvd",
    "frechet_distance",
    "fvd_from_features",
    "gaussian_stats",
    "missing_detector_message",
    "preprocess_clips",
]

# The quickstart's synthetic moving-shapes world and its class-consistency checker.
from nbp_ds.eval.consistency import analyze_clip, classify_clip, consistency_report  # noqa: E402
from nbp_ds.eval.synthetic import CLASSES as SYNTHETIC_CLASSES  # noqa: E402
from nbp_ds.eval.synthetic import render_clip  # noqa: E402

__all__ += ["SYNTHETIC_CLASSES", "analyze_clip", "classify_clip", "consistency_report", "render_clip"]
