"""Generation speed, for ``nbp-bench-generate``: whole decodes timed at their best, long static decodes estimated
from passes spread over the video, and the memory-bandwidth floor every pass is held to (all weights read once).

Timings are wall clock around work that ends with the device synchronised (``generate`` synchronises before it
returns; the spread passes synchronise around their loop).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from nbp_ds.generate import Sampling, generate
from nbp_ds.generate.decode import kept_decoder
from nbp_ds.generate.draw import video_keys
from nbp_ds.generate.static import StaticDecoder


def variants(width: int) -> dict[str, list[str]]:
    """NBP with one row of the latent grid per block (the paper's 1x1x16 on its 16-wide grid), its hybrid
    form, and next-token prediction, as run-config overrides."""
    row = f"layout.block=[1,1,{width}]"
    return {f"NBP 1x1x{width}": [row, "layout.hybrid=false"],
            "NBP hybrid": [row, "layout.hybrid=true"],
            "NTP 1x1x1": ["layout.block=[1,1,1]", "layout.hybrid=false"]}


def video_frames(latent_frames: int, temporal_compression: int) -> int:
    """Frames of the decoded video: the first latent frame is one frame, each later one several."""
    return 1 + (latent_frames - 1) * temporal_compression


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second a device-to-device copy moves (each byte read once and written once)."""
    size = (256 if device.type == "cuda" else 64) * 2**20
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    repeats = 10
    began = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    synchronize(device)
    return 2 * size * repeats / (time.perf_counter() - began)


def weight_bytes(model: torch.nn.Module) -> int:
    """What one decoding pass reads at least: every weight once."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


@dataclass
class Row:
    passes: int
    seconds: float  # per batch (best of the timed runs, or scaled from the timed passes)
    estimated_from: int = 0  # passes timed when the row is an estimate


def inputs(model, batch: int) -> dict:
    """The conditions ``generate`` needs for the model's layout: a label per video, or all-zero context frames."""
    lay = model.layout
    device = next(model.parameters()).device
    if lay.condition == "class":
        return {"label": torch.arange(batch) % lay.num_classes}
    if lay.condition == "frames":
        return {"context": torch.zeros(batch, lay.context_frames, *lay.grid[1:], dtype=torch.long, device=device)}
    return {}


def time_whole_videos(model, batch: int, sampling: dict, mode: str, repeats: int, budget: float) -> Row:
    """Best wall-clock time of whole decodes after a warm-up (allocations, kernel choice, graph capture); stops
    early once the timed runs took ``budget`` seconds (at least one run)."""
    args = {**inputs(model, batch), **sampling, "mode": mode}
    _, stats = generate(model, batch, seed=0, **args)
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) < budget):
        began = time.perf_counter()
        generate(model, batch, seed=len(times) + 1, **args)
        times.append(time.perf_counter() - began)  # generate synchronises the device before it returns
    return Row(stats["forward_passes"], min(times))


def time_spread_passes(model, batch: int, sampling: dict, mode: str, timed: int) -> Row:
    """Time ``timed`` passes spread evenly over the video (every attention length in proportion) with the static
    decoder, and scale to all passes: a long next-token decode estimated without running all of it."""
    lay = model.layout
    settings = Sampling(**sampling)
    decoder = (kept_decoder(model, batch, settings) if mode == "graph" else StaticDecoder(model, batch, settings))
    device = decoder.device
    label = inputs(model, batch).get("label")
    condition = lay.condition_ids(label.to(device)) if lay.prefix_len else None
    decoder.prepare(torch.zeros_like(decoder.tokens), condition, video_keys(0, torch.arange(batch, device=device)))
    passes = decoder.passes
    steps = sorted({round(i * (passes - 1) / (timed - 1)) for i in range(timed)})
    decoder.decode(steps[: max(1, len(steps) // 8)])  # warm-up
    synchronize(device)
    began = time.perf_counter()
    decoder.decode(steps)
    synchronize(device)
    return Row(passes, (time.perf_counter() - began) * passes / len(steps), estimated_from=len(steps))


def time_decoding(model, batch: int, sampling: dict, mode: str, repeats: int, budget: float,
                  estimate_passes: int) -> Row:
    """One table row: whole videos, or, with a static or graph decoder at batch >= 32 (next-token prediction's
    long decodes), ``estimate_passes`` passes spread over the video when it has more (0 = always whole)."""
    passes = len(model.layout.generation_steps)
    if mode != "eager" and batch >= 32 and estimate_passes and passes > estimate_passes:
        return time_spread_passes(model, batch, sampling, mode, estimate_passes)
    return time_whole_videos(model, batch, sampling, mode, repeats, budget)
