"""Long-sampling cost: frames/s and peak memory at 17, 65 and 257 video frames, per decoder and long mode.

A window of the clip's length slides one latent frame at a time (docs/sampling.md), so frames/s and memory should
not depend on the length: the table shows whether they do.

    nbp-bench-long-sample                                               # a small model, CPU-friendly
    nbp-bench-long-sample --config ucf101-700m --full-size --device cuda --batch 8   # the paper's 700M model

Rows: decoder (eager, static, graph), long mode (rolling: the window's cache kept; recompute: each window fed
from scratch), video frames, forward passes, seconds, frames/s (video frames of the batch per second of decoding)
and the memory decoding added at its peak (CUDA: the allocator's peak; CPU: the high-water mark of the
process's resident memory). Models have random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import sys

import torch

from nbp_ds.cli import command
from nbp_ds.cli.bench_model import add_model_args, add_model_tail_args, base_overrides
from nbp_ds.cli.bench_model import dtype_name as bench_dtype_name
from nbp_ds.config import load_config
from nbp_ds.errors import UsageError
from nbp_ds.generate import LONG_MODES, MODES, PAPER_SAMPLING, resolve_mode
from nbp_ds.generate.long import DEFAULT_SINK_FRAMES, LongWindow, resolve_long_mode
from nbp_ds.model import build_model
from nbp_ds.perf.generate_bench import video_frames
from nbp_ds.perf.long_sample_bench import time_long_sample, warm_up

SAMPLING = {k: v for k, v in PAPER_SAMPLING.items() if k != "cfg_scale"}


@command
def main(argv: list[str] | None = None) -> int | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--batch", type=int, default=1, help="videos decoded together")
    parser.add_argument("--frames", type=int, nargs="+", default=[17, 65, 257],
                        help="video frames per sample, each 1 + 4k and at least the clip's (default 17 65 257)")
    parser.add_argument("--decoders", nargs="+", choices=[m for m in MODES if m != "auto"], default=None,
                        help="default: graph and eager on CUDA, eager and static elsewhere")
    parser.add_argument("--long-modes", nargs="+", choices=[m for m in LONG_MODES if m != "auto"],
                        default=["rolling", "recompute"])
    parser.add_argument("--sink-frames", type=int, default=DEFAULT_SINK_FRAMES)
    add_model_tail_args(parser)
    args = parser.parse_intermixed_args(argv)
    device = torch.device(args.device)
    f = args.temporal_compression
    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    dtype_name = bench_dtype_name(args, device)
    overrides = base_overrides(args)
    cfg = load_config(args.config, overrides)
    clip_frames = video_frames(cfg.layout.grid[0], f)
    bad = [n for n in args.frames if n < clip_frames or (n - 1) % f]
    if bad:
        raise UsageError(f"--frames must be 1 + {f}k and at least the clip's {clip_frames}, got {bad}")
    torch.manual_seed(0)
    model = build_model(cfg, device=device).to(torch.bfloat16 if dtype_name == "bf16" else torch.float32).eval()
    decoders = args.decoders or (["graph", "eager"] if device.type == "cuda" else ["eager", "static"])
    try:
        LongWindow.of(model.layout, args.sink_frames)
        for decoder in decoders:
            resolve_mode(decoder, model)
        for long_mode in args.long_modes:
            resolve_long_mode(long_mode, model)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"config {cfg.name} ({cfg.model.n_layer} layers, width {cfg.model.d_model}), clip {cfg.layout.grid} "
          f"({clip_frames} frames), block {cfg.layout.block}, hybrid {cfg.layout.hybrid}, {device} {dtype_name}, "
          f"batch {args.batch}, sink frames {args.sink_frames}, paper sampling", flush=True)
    print(f"{'decoder':<8} {'long mode':<10} {'frames':>7} {'passes':>7} {'seconds':>9} {'frames/s':>9} "
          f"{'peak MiB':>9}", flush=True)
    for decoder in decoders:
        for long_mode in args.long_modes:
            warm_up(model, args.batch, SAMPLING, decoder, long_mode, args.sink_frames)
            for frames in args.frames:
                latent = 1 + (frames - 1) // f
                row = time_long_sample(model, args.batch, latent, f, SAMPLING, decoder, long_mode,
                                       args.sink_frames)
                print(f"{decoder:<8} {long_mode:<10} {row.frames:>7} {row.passes:>7} {row.seconds:>9.2f} "
                      f"{args.batch * row.frames / row.seconds:>9.1f} {row.peak_bytes / 2**20:>9.1f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
