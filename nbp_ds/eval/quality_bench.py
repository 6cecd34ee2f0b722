"""Next-block versus next-token prediction at equal training compute, on the quickstart's synthetic world.

Every variant is the same model (the run config's size) trained on the same token shards for the same number of
steps of the same batch: the sequence (class token, BOV block, video blocks but the last) has 1 + T*H*W positions
whatever the block, so the training FLOPs are equal step by step. Only ``layout.block`` differs: a row (1x1xW), a
frame (1xHxW), or one token (1x1x1, next-token prediction); none starts token by token (``layout.hybrid`` off).
Each variant reports its validation loss against training FLOPs, its samples' rung of the quality ladder, and per
sampled video the forward passes and wall time.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from nbp_ds.config import load_config
from nbp_ds.errors import UsageError
from nbp_ds.eval.consistency import consistency_report
from nbp_ds.eval.quality import rung_from_report
from nbp_ds.generate import QUICKSTART_SAMPLING, generate
from nbp_ds.model import build_model
from nbp_ds.tied_process import run_tied
from nbp_ds.tokenizer.model import load_tokenizer
from nbp_ds.weights.export import load_exported

log = logging.getLogger(__name__)


@dataclass
class VariantResult:
    """One block shape's measurements."""

    name: str
    block: list[int]
    params: int
    steps: int
    flops_per_step: float
    val_curve: list[tuple[float, float]]  # (training FLOPs, validation loss)
    samples: dict[str, Any]  # the ladder's samples rung
    passes_per_video: float
    seconds_per_video: float  # decoding the tokens (the transformer), batch of one video per class
    train_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


# every variant is plain next-block (or next-token) prediction, whatever token-by-token start the run config has
# (the quickstart's draws its first latent frame token by token): the paper's comparison is of the block alone
PURE_LAYOUT = ["layout.hybrid=false", "layout.hybrid_blocks=1"]


def block_variants(grid: list[int]) -> dict[str, list[int]]:
    """The block shapes compared on a token grid (T, H, W): a row, a frame, one token."""
    _, h, w = grid
    return {"row": [1, 1, w], "frame": [1, h, w], "ntp": [1, 1, 1]}


def train_variant(config: str, block: list[int], shards: Path, out: Path, steps: int, nproc: int,
                  overrides: list[str]) -> float:
    """Train one variant into ``out`` (a subprocess per run, as the quickstart does); returns its wall seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "nbp_ds.train", "--config", config, f"data.train={shards / 'train'}", f"data.val={shards / 'val'}",
           f"train.out_dir={out}", f"train.steps={steps}", f"layout.block={json.dumps(block)}",
           f"train.save_every={steps}", "train.sample_every=0", *PURE_LAYOUT, *overrides]
    log.info("training %s: %s", out.name, " ".join(cmd))
    began = time.perf_counter()
    result = run_tied(cmd, env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})
    if result.returncode != 0:
        raise UsageError(f"training the {out.name} variant failed (exit {result.returncode}); its log is above")
    return time.perf_counter() - began


def validation_curve(run: Path, flops_per_step: float) -> list[tuple[float, float]]:
    """(training FLOPs, val/loss) at every evaluation of a run, read from its metrics.jsonl."""
    points = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "val/loss" in record:
            points.append((record["step"] * flops_per_step, float(record["val/loss"])))
    return points


@torch.no_grad()
def sample_and_check(run: Path, tokenizer_path: str, classes: dict[str, int], per_class: int, seed: int,
                     sampling: dict[str, Any]) -> tuple[dict[str, Any], float, float]:
    """Sample ``per_class`` videos of every class from a run's last checkpoint, decode them with the tokenizer and
    read them with the checker: (samples rung, forward passes per video, transformer seconds per video)."""
    model, cfg = load_exported(run)
    tokenizer = load_tokenizer(tokenizer_path, "cpu").eval()
    labels = torch.arange(cfg.layout.num_classes)
    videos, video_labels, passes, seconds = [], [], 0, 0.0
    for round_ in range(per_class):
        index = torch.arange(round_ * len(labels), (round_ + 1) * len(labels))
        began = time.perf_counter()
        tokens, stats = generate(model, len(labels), label=labels, seed=seed, video_index=index, mode="eager",
                                 **sampling)
        seconds += time.perf_counter() - began
        passes += stats["forward_passes"]
        videos.extend(tokenizer.decode(tokens).numpy())
        video_labels.extend(labels.tolist())
    rung = rung_from_report(consistency_report(iter(videos), video_labels, classes))
    # one batch holds one video per class: a batch's passes and seconds are every video's in it
    return rung, passes / per_class, seconds / (per_class * len(labels))


def run_bench(quickstart_out: Path, out: Path, steps: int, per_class: int, nproc: int, config: str,
              overrides: list[str], variants: list[str] | None = None, seed: int = 0,
              sampling: dict[str, Any] | None = None) -> list[VariantResult]:
    """Train and sample every variant on a finished quickstart's shards and tokenizer; write the table and plot.
    ``sampling``: generate's temperature, top_k, top_p and cfg_scale (default: the quickstart's)."""
    sampling = dict(QUICKSTART_SAMPLING if sampling is None else sampling)
    shards, tokenizer = quickstart_out / "shards", quickstart_out / "tokenizer" / "tokenizer"
    for needed in (shards / "train", shards / "val", tokenizer):
        if not needed.exists():
            raise UsageError(f"{needed}: missing; run the quickstart into {quickstart_out} first (its shards and "
                             f"tokenizer are what the variants share)")
    classes = {str(k): int(v) for k, v in json.loads((shards / "train" / "classes.json").read_text()).items()}
    base = load_config(config, overrides)
    shapes = block_variants(base.layout.grid)
    unknown = sorted(set(variants or []) - set(shapes))
    if unknown:
        raise UsageError(f"--variants: unknown {unknown}; known: {sorted(shapes)}")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in variants or list(shapes):
        cfg = load_config(config, [*PURE_LAYOUT, *overrides, f"layout.block={json.dumps(shapes[name])}"])
        model = build_model(cfg, device="meta")
        tokens_per_step = model.layout.seq_len * cfg.train.micro_batch * cfg.train.grad_accum * nproc
        flops_per_step = model.flops_per_token() * tokens_per_step
        run = out / name
        train_seconds = train_variant(config, shapes[name], shards, run, steps, nproc, overrides)
        rung, passes, seconds = sample_and_check(run, str(tokenizer), classes, per_class, seed, sampling)
        results.append(VariantResult(name, shapes[name], model.num_params(), steps, flops_per_step,
                                     validation_curve(run, flops_per_step), rung, passes, seconds, train_seconds))
        log.info("%s: %s", name, format_row(results[-1]))
    write_results(results, out, {"steps": steps, "nproc": nproc, "config": config, "overrides": overrides,
                                 "samples_per_class": per_class, "seed": seed, "sampling": sampling})
    return results


def format_row(r: VariantResult) -> str:
    last = r.val_curve[-1][1] if r.val_curve else float("nan")
    s = r.samples

    def pct(key: str) -> str:
        return f"{100 * s[key]['rate']:.0f}% [{100 * s[key]['low']:.0f}-{100 * s[key]['high']:.0f}]"

    return (f"| {r.name} {'x'.join(map(str, r.block))} | {r.flops_per_step * r.steps:.2e} "
            f"| {last:.3f} | {pct('shape')} | {pct('direction')} | {pct('color')} | {s['count']} "
            f"| {r.passes_per_video:.0f} | {1000 * r.seconds_per_video:.1f} |")


TABLE_HEADER = ("| variant (block) | training FLOPs | val loss | shape | direction | colour | samples | passes/video "
                "| ms/video |\n|---|---|---|---|---|---|---|---|---|")


def markdown_table(results: list[VariantResult]) -> str:
    """The comparison as a markdown table, and each NBP variant's sampling speed-up over NTP."""
    lines = [TABLE_HEADER, *(format_row(r) for r in results)]
    ntp = next((r for r in results if r.block == [1, 1, 1]), None)
    if ntp is not None:
        for r in results:
            if r is not ntp:
                lines.append(f"\n{r.name}: {ntp.seconds_per_video / r.seconds_per_video:.1f}x faster sampling than "
                             f"NTP ({ntp.passes_per_video / r.passes_per_video:.0f}x fewer forward passes)")
    return "\n".join(lines)


def plot_curves(results: list[VariantResult], path: Path, size: tuple[int, int] = (640, 420)) -> None:
    """Validation loss against training FLOPs, one line per variant, drawn with Pillow (a PNG)."""
    width, height = size
    left, right, top, bottom = 70, 20, 20, 50
    points = [p for r in results for p in r.val_curve]
    if not points:
        raise UsageError("no validation losses to plot (train.eval_every larger than the steps?)")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = 0.0, max(xs)
    y0, y1 = min(ys), max(ys)
    y0, y1 = (y0 - 0.05, y1 + 0.05) if y1 - y0 < 1e-6 else (y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0))
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0 or 1) * (width - left - right),
                top + (y1 - y) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        draw.text((5, at(0, y)[1] - 6), f"{y:.2f}", fill="black")
        x = x0 + (x1 - x0) * i / 4
        draw.text((at(x, y0)[0] - 20, height - bottom + 5), f"{x:.1e}", fill="black")
    draw.text((width // 2 - 60, height - 20), "training FLOPs", fill="black")
    draw.text((left + 5, top + 2), "validation loss", fill="black")
    colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]
    for k, r in enumerate(results):
        line = [at(x, y) for x, y in r.val_curve]
        colour = colours[k % len(colours)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for px, py in line:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.text((width - right - 150, top + 8 + 14 * k), f"{r.name} {'x'.join(map(str, r.block))}", fill=colour)
    image.save(path)


def write_results(results: list[VariantResult], out: Path, settings: dict[str, Any]) -> None:
    """out/quality_bench.md (the table), .json (everything), .png (the curves)."""
    (out / "quality_bench.md").write_text(markdown_table(results) + "\n")
    (out / "quality_bench.json").write_text(json.dumps({"settings": settings,
                                                        "variants": [asdict(r) for r in results]}, indent=1) + "\n")
    plot_curves(results, out / "quality_bench.png")


__all__ = ["VariantResult", "block_variants", "markdown_table", "plot_curves", "run_bench", "validation_curve"]
