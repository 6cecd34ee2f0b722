"""The quality ladder of the synthetic world: where a video's class (shape, direction, colour) is kept or lost.

Three rungs, each read by the same model-free checker (``nbp_ds.eval.consistency``):

  source          the held-out clips themselves: the checker's own ceiling, measured rather than assumed
  reconstruction  the tokenizer's encode -> decode of those clips (plus PSNR, SSIM and the per-channel colour error
                  of the object's pixels): what the tokens can still show
  samples         the generator's videos: what the transformer and the sampler made of the tokens

Every rate comes with its count and a 95% Wilson score interval, so a rung measured on 48 videos is not read as
more certain than it is. A reconstruction's colour counts only when it is its source's colour; a sample's when
the checker reads one palette colour from its first frame to its last (a class has no colour of its own).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from nbp_ds.eval.consistency import analyze_clip, consistency_report
from nbp_ds.tokenizer.base import VideoTokenizerBase
from nbp_ds.tokenizer.model import to_float
from nbp_ds.tokenizer.training import psnr, ssim

RUNGS = ("source", "reconstruction", "samples")
READINGS = ("shape", "direction", "color")
Z_95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval


def wilson_interval(hits: int, count: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate hits/count (Wilson 1927): (low, high) in [0, 1].

    Unlike the normal approximation it stays inside [0, 1] and is not of zero width at 0% or 100%.
    """
    if count <= 0:
        raise ValueError(f"wilson_interval needs count > 0, got {count}")
    if not 0 <= hits <= count:
        raise ValueError(f"wilson_interval needs 0 <= hits <= count, got hits={hits}, count={count}")
    p = hits / count
    denominator = 1 + z * z / count
    centre = (p + z * z / (2 * count)) / denominator
    half = z * math.sqrt(p * (1 - p) / count + z * z / (4 * count * count)) / denominator
    # At 0 (or all) hits the exact end is 0 (or 1); the formula gives it only up to rounding.
    low = 0.0 if hits == 0 else max(0.0, centre - half)
    high = 1.0 if hits == count else min(1.0, centre + half)
    return low, high


def rung_from_report(report: dict[str, Any]) -> dict[str, Any]:
    """{count, shape, direction, color, overall: {hits, rate, low, high}} of a consistency_report."""
    count = report["count"]
    rung: dict[str, Any] = {"count": count}
    for key in (*READINGS, "overall"):
        hits = int(report["hits"][key])
        low, high = wilson_interval(hits, count)
        rung[key] = {"hits": hits, "rate": hits / count, "low": low, "high": high}
    return rung


@torch.no_grad()
def reconstruct(tokenizer: VideoTokenizerBase, clips: np.ndarray, batch: int = 16) -> np.ndarray:
    """The tokenizer's encode -> decode of uint8 clips [N, T, H, W, 3] (same shape, uint8)."""
    out = [tokenizer.decode(tokenizer.encode(torch.from_numpy(np.ascontiguousarray(clips[i:i + batch]))))
           .cpu().numpy() for i in range(0, len(clips), batch)]
    return np.concatenate(out)


def reconstruction_errors(source: np.ndarray, recon: np.ndarray) -> dict[str, Any]:
    """PSNR (dB) and SSIM of the whole clips, and the mean absolute error per channel (R, G, B; 0..255) over the
    object's pixels in the source (where the colour is: the background is most of a frame and hides it)."""
    if source.shape != recon.shape:
        raise ValueError(f"source {source.shape} and reconstruction {recon.shape} differ in shape")
    a, b = to_float(torch.from_numpy(source)), to_float(torch.from_numpy(recon))
    scores = [psnr(b[i:i + 1], a[i:i + 1]) for i in range(len(a))]
    errors, pixels = np.zeros(3), 0
    for clip, rebuilt in zip(source, recon, strict=True):
        masks = analyze_clip(clip)["masks"]
        difference = np.abs(clip[masks].astype(np.float64) - rebuilt[masks].astype(np.float64))
        errors += difference.sum(axis=0)
        pixels += len(difference)
    return {"psnr": float(np.mean(scores)), "ssim": ssim(b, a),
            "color_error_rgb": [float(e) for e in errors / max(pixels, 1)]}


def quality_ladder(source: np.ndarray, source_labels: Sequence[int], classes: Mapping[str, int],
                   tokenizer: VideoTokenizerBase | None = None, samples: Sequence[np.ndarray] | None = None,
                   sample_labels: Sequence[int] | None = None) -> dict[str, Any]:
    """The ladder's rungs (``RUNGS``) as {rung: {count, shape, direction, color, overall, ...}}.

    ``source`` uint8 [N, T, H, W, 3] held-out clips with their class ids; ``tokenizer`` adds the reconstruction
    rung, ``samples`` (each uint8 [T, H, W, 3]) with their ``sample_labels`` the samples rung.
    """
    ladder: dict[str, Any] = {}
    source_report = consistency_report(iter(source), source_labels, classes)
    ladder["source"] = rung_from_report(source_report)
    if tokenizer is not None:
        recon = reconstruct(tokenizer, source)
        # A reconstruction keeps the colour when it shows its source's colour (as the checker reads the source).
        colors = [v["color"] for v in source_report["videos"]]
        ladder["reconstruction"] = {**rung_from_report(consistency_report(iter(recon), source_labels, classes,
                                                                          reference_colors=colors)),
                                    **reconstruction_errors(source, recon)}
    if samples is not None:
        if sample_labels is None:
            raise ValueError("quality_ladder: samples need sample_labels")
        ladder["samples"] = rung_from_report(consistency_report(iter(samples), sample_labels, classes))
    return ladder


def format_ladder(ladder: dict[str, Any]) -> str:
    """The ladder as a plain-text table: one row per rung, each rate with its 95% interval."""

    def cell(r: dict[str, float]) -> str:
        return f"{100 * r['rate']:5.1f}% [{100 * r['low']:3.0f}-{100 * r['high']:3.0f}]"

    lines = [f"{'rung':<15} {'n':>4}  {'shape':<16} {'direction':<16} {'colour':<16} extra"]
    for name in RUNGS:
        if name not in ladder:
            continue
        r = ladder[name]
        extra = ""
        if "psnr" in r:
            rgb = "/".join(f"{e:.0f}" for e in r["color_error_rgb"])
            extra = f"PSNR {r['psnr']:.1f} dB, SSIM {r['ssim']:.3f}, object colour error R/G/B {rgb}"
        lines.append(f"{name:<15} {r['count']:>4}  {cell(r['shape'])} {cell(r['direction'])} {cell(r['color'])} "
                     f"{extra}".rstrip())
    lines.append("(rates with their 95% Wilson intervals; colour: the object's palette colour kept from the first "
                 "frame to the last, and for reconstructions the source's)")
    return "\n".join(lines)


def ladder_scalars(ladder: dict[str, Any]) -> dict[str, float]:
    """The ladder as flat TensorBoard scalars: quality/<rung>/<reading> (rates), PSNR, SSIM, colour errors."""
    scalars = {}
    for name, r in ladder.items():
        for key in (*READINGS, "overall"):
            scalars[f"quality/{name}/{key}"] = r[key]["rate"]
        if "psnr" in r:
            scalars[f"quality/{name}/psnr"] = r["psnr"]
            scalars[f"quality/{name}/ssim"] = r["ssim"]
            for channel, error in zip("rgb", r["color_error_rgb"], strict=True):
                scalars[f"quality/{name}/color_error_{channel}"] = error
    return scalars


__all__ = ["RUNGS", "format_ladder", "ladder_scalars", "quality_ladder", "reconstruct", "reconstruction_errors",
           "rung_from_report", "wilson_interval"]
