"""Generation speed: next-block (1x1x16, plain and hybrid) vs next-token (1x1x1) prediction.

Three models of the same size on the same token grid (the paper's 5x16x16 = 1280 tokens by
default), random weights (speed does not depend on them), KV-cache decoding with sampling:

    nbp-bench-generate                                  # a small model, CPU-friendly
    nbp-bench-generate --config ucf101-700m --device cuda --dtype bf16 --batch-size 8

Prints forward passes, seconds per video, frames per second (video frames, 17 per 5 latent
frames) and the NTP/NBP wall-clock ratio (the paper reports 11x for its 700M model).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from nbp_ds.cli import command
from nbp_ds.config import load_config
from nbp_ds.generate import generate
from nbp_ds.model import build_model


def variants(width: int) -> dict[str, list[str]]:
    """NBP with one row of the latent grid per block (the paper's 1x1x16 on its 16-wide grid), its hybrid
    form, and next-token prediction."""
    row = f"layout.block=[1,1,{width}]"
    return {f"NBP 1x1x{width}": [row, "layout.hybrid=false"],
            "NBP hybrid": [row, "layout.hybrid=true"],
            "NTP 1x1x1": ["layout.block=[1,1,1]", "layout.hybrid=false"]}

SMALL = ["model.n_layer=4", "model.d_model=256", "model.n_head=4", "model.vocab_size=64000"]


def video_frames(latent_frames: int, temporal_compression: int) -> int:
    """Frames of the decoded video: the first latent frame is one frame, each later one several."""
    return 1 + (latent_frames - 1) * temporal_compression


def bench(cfg_overrides: list[str], config: str, device: str, dtype: torch.dtype, batch: int, repeats: int) -> dict:
    cfg = load_config(config, cfg_overrides)
    torch.manual_seed(0)
    model = build_model(cfg).to(device=device, dtype=dtype).eval()
    label = 0 if cfg.layout.condition == "class" else None
    context = None
    if cfg.layout.condition == "frames":
        context = torch.zeros(batch, cfg.layout.context_frames, *cfg.layout.grid[1:], dtype=torch.long, device=device)
    generate(model, batch, label=label, context=context, seed=0)  # warm-up (allocations, kernels, compile)
    seconds = []
    for r in range(repeats):
        began = time.perf_counter()
        _, stats = generate(model, batch, label=label, context=context, seed=r + 1)
        seconds.append(time.perf_counter() - began)
    best = min(seconds)
    return {"passes": stats["forward_passes"], "seconds": best, "grid": cfg.layout.grid}


@command
def main(argv: list[str] | None = None) -> int | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="ucf101-700m",
                        help="run config whose layout/model to use (default ucf101-700m, shrunk unless --full-size)")
    parser.add_argument("--full-size", action="store_true", help="keep the config's model size (else 4x256)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per variant (best is reported)")
    parser.add_argument("--temporal-compression", type=int, default=4, help="video frames per later latent frame")
    parser.add_argument("--attention", default="sdpa", help="model.attention for decoding (sdpa or flash)")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_intermixed_args(argv)
    dtype_name = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    base = ([] if args.full_size else SMALL) + [f"model.attention={args.attention}"] + args.overrides

    # the config's own block may not fit the variants' layouts; validate with next-token blocks first
    cfg = load_config(args.config, [*base, "layout.block=[1,1,1]", "layout.hybrid=false"])
    rows = {}
    for name, overrides in variants(cfg.layout.grid[2]).items():
        rows[name] = bench(base + overrides, args.config, args.device, dtype, args.batch_size, args.repeats)
    frames = video_frames(cfg.layout.grid[0], args.temporal_compression)
    ntp = rows["NTP 1x1x1"]["seconds"]
    print(f"config {cfg.name} ({cfg.model.n_layer} layers, width {cfg.model.d_model}), grid {cfg.layout.grid}, "
          f"batch {args.batch_size}, {args.device} {dtype_name}, {frames} video frames per sample")
    print(f"{'variant':<12} {'passes':>7} {'s/video':>9} {'frames/s':>9} {'NTP/this':>9}")
    for name, r in rows.items():
        per_video = r["seconds"] / args.batch_size
        print(f"{name:<12} {r['passes']:>7} {per_video:>9.3f} {frames / per_video:>9.2f} {ntp / r['seconds']:>8.1f}x")


if __name__ == "__main__":
    sys.exit(main())
