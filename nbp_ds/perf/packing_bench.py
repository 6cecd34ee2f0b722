"""Packed against padded training on a mixed dataset: the same clips, trained once packed into rows of
``data.pack_tokens`` positions (first fit, as the packing loader places them) and once one clip per row padded to
the longest clip; the figures are the padding fraction and the real (non-padding) tokens per second."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nbp_ds.config import RunConfig
from nbp_ds.layout import Layout
from nbp_ds.packing import Clip, clip_length, pack_rows
from nbp_ds.perf.timing import median, time_repeats
from nbp_ds.perf.train_step import build_training, make_step


@dataclass(frozen=True)
class PackingRow:
    mode: str
    rows: int  # rows for the whole set of clips
    row_length: int
    padding_fraction: float
    seconds: float  # training on every clip once (one optimizer step per micro-batch)
    real_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds


def mixed_clips(grids: list[tuple[int, int, int]], count: int, vocab_size: int, num_classes: int,
                seed: int = 0) -> list[Clip]:
    """``count`` clips of random tokens, their grids drawn uniformly from ``grids``."""
    rng = np.random.default_rng(seed)
    return [Clip(rng.integers(0, vocab_size, grids[rng.integers(len(grids))]),
                 int(rng.integers(max(num_classes, 1))) if num_classes else None) for _ in range(count)]


def first_fit_rows(layout: Layout, clips: list[Clip], length: int) -> list[list[Clip]]:
    """Clips in their order, each in the first row with room for it (a new row when none has)."""
    rows: list[list[Clip]] = []
    free: list[int] = []
    for clip in clips:
        need = clip_length(layout, clip.grid)
        row = next((r for r, room in enumerate(free) if room >= need), None)
        if row is None:
            rows.append([])
            free.append(length)
            row = len(rows) - 1
        rows[row].append(clip)
        free[row] -= need
    return rows


def measure(cfg: RunConfig, clips: list[Clip], pack_tokens: int, micro_batch: int, device: torch.device,
            precision: str, repeats: int, warmup: int) -> list[PackingRow]:
    """One row per mode (packed, padded): the time to train on every clip once, micro-batches of ``micro_batch``
    rows, the median of ``repeats`` passes after ``warmup``."""
    layout = Layout.from_config(cfg.layout, cfg.model.vocab_size)
    longest = max(clip_length(layout, c.grid) for c in clips)
    if longest > pack_tokens:
        raise ValueError(f"a clip needs {longest} positions, more than --pack-tokens {pack_tokens}")
    real = sum(clip_length(layout, c.grid) for c in clips)
    plans = {"packed": (first_fit_rows(layout, clips, pack_tokens), pack_tokens),
             "padded": ([[c] for c in clips], longest)}
    out = []
    for mode, (rows, length) in plans.items():
        model, optimizer, autocast = build_training(cfg, device, precision)
        batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v
                    for k, v in pack_rows(layout, rows[i:i + micro_batch], length).items()}
                   for i in range(0, len(rows), micro_batch)]
        steps = [make_step(model, optimizer, autocast, b) for b in batches]

        def epoch(steps=steps) -> None:
            for step in steps:
                step()

        seconds = median(time_repeats(epoch, repeats, warmup, device))
        out.append(PackingRow(mode, len(rows), length, 1 - real / (len(rows) * length), seconds, real))
    return out
