"""Generation speed: next-block (1x1x16, plain and hybrid) vs next-token (1x1x1) prediction, at batch 1, 8 and 32.

Three models of the same size on the same token grid (the paper's 5x16x16 = 1280 tokens by default), random
weights (speed does not depend on them), each built once, directly on the device, and decoded at every batch size:

    nbp-bench-generate                                          # a small model, CPU-friendly
    nbp-bench-generate --config ucf101-700m --full-size --device cuda    # the paper's 700M model (< 1 min, H100)
    nbp-bench-generate --config tiny --batch-sizes 1 2 --mode static     # another decoder, other batches

A row is printed as each (variant, batch) finishes: forward passes per video, seconds per video, frames/s
(decoded video frames, 17 per 5 latent frames), videos/s, milliseconds per pass and the memory-bandwidth
ceiling in frames/s (every pass reads all weights once: weight bytes / the device's measured copy bandwidth
per pass). The NTP/NBP wall-clock ratio per batch size ends the table (the paper reports 11x and 8.89 frames/s
for its 700M model). Sampling is the paper's (top-k 16,000, top-p 0.9, temperature 1) unless --sampling says
otherwise. With a static or graph decoder, a variant of more passes than --estimate-passes at batch >= 32
(next-token prediction) is timed over that many passes spread over the video and scaled to the whole video;
its row says so.
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
from nbp_ds.generate import MODES, PAPER_SAMPLING, release_decoders, resolve_mode
from nbp_ds.model import build_model
from nbp_ds.perf.generate_bench import (
    Row,
    copy_bandwidth,
    time_decoding,
    variants,
    video_frames,
    weight_bytes,
)

SAMPLINGS = {"paper": {k: v for k, v in PAPER_SAMPLING.items() if k != "cfg_scale"},
             "plain": {"temperature": 1.0}, "greedy": {"temperature": 0.0}}


def print_row(name: str, batch: int, row: Row, frames: int, floor_seconds: float) -> None:
    per_video = row.seconds / batch
    ceiling = batch * frames / (row.passes * floor_seconds)
    note = f"  estimated from {row.estimated_from} of {row.passes} passes" if row.estimated_from else ""
    print(f"{name:<12} {batch:>5} {row.passes:>7} {per_video:>9.4f} {frames / per_video:>9.1f} "
          f"{1 / per_video:>9.2f} {1000 * row.seconds / row.passes:>8.2f} {ceiling:>10.0f}{note}", flush=True)


@command
def main(argv: list[str] | None = None) -> int | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="default: 1 8 32")
    parser.add_argument("--mode", choices=MODES, default="auto",
                        help="decoder (default auto: CUDA graphs on a GPU, eager elsewhere)")
    parser.add_argument("--sampling", choices=sorted(SAMPLINGS), default="paper",
                        help="paper: top-k 16000, top-p 0.9, T 1 (default); plain: T 1; greedy: argmax")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row at most (the best is reported)")
    parser.add_argument("--row-seconds", type=float, default=3.0,
                        help="stop repeating a row once its timed runs took this long (default 3)")
    parser.add_argument("--estimate-passes", type=int, default=320,
                        help="at batch >= 32, time this many passes of a longer decode and scale (static and graph "
                             "decoders; 0 = always whole videos)")
    add_model_tail_args(parser)
    args = parser.parse_intermixed_args(argv)
    if min(args.batch_sizes) < 1 or args.repeats < 1 or args.estimate_passes < 0:
        raise UsageError("--batch-sizes and --repeats must be >= 1, --estimate-passes >= 0")
    if args.estimate_passes == 1:
        raise UsageError("--estimate-passes must be 0 (off) or >= 2")
    device = torch.device(args.device)
    dtype_name = bench_dtype_name(args, device)
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    base = base_overrides(args)
    sampling = SAMPLINGS[args.sampling]

    # the config's own block may not fit the variants' layouts; validate with next-token blocks first
    cfg = load_config(args.config, [*base, "layout.block=[1,1,1]", "layout.hybrid=false"])
    frames = video_frames(cfg.layout.grid[0], args.temporal_compression)
    bandwidth = copy_bandwidth(device)
    print(f"config {cfg.name} ({cfg.model.n_layer} layers, width {cfg.model.d_model}), grid {cfg.layout.grid}, "
          f"{device} {dtype_name}, sampling {args.sampling} {sampling}, {frames} video frames per sample", flush=True)
    seconds: dict[tuple[str, int], float] = {}
    header_done = False
    for name, overrides in variants(cfg.layout.grid[2]).items():
        torch.manual_seed(0)
        model = build_model(load_config(args.config, base + overrides), device=device).to(dtype).eval()
        try:
            mode = resolve_mode(args.mode, model)
        except ValueError as exc:
            raise UsageError(f"--mode {args.mode}: {exc}") from exc
        if not header_done:
            weights = weight_bytes(model)
            floor = weights / bandwidth
            print(f"decoder {mode}; bandwidth floor: {weights / 1e9:.3f} GB of weights / {bandwidth / 1e9:.0f} "
                  f"GB/s measured copy bandwidth = {1000 * floor:.3f} ms per pass", flush=True)
            print(f"{'variant':<12} {'batch':>5} {'passes':>7} {'s/video':>9} {'frames/s':>9} {'videos/s':>9} "
                  f"{'ms/pass':>8} {'floor f/s':>10}", flush=True)
            header_done = True
        for batch in args.batch_sizes:
            row = time_decoding(model, batch, sampling, mode, args.repeats, args.row_seconds, args.estimate_passes)
            print_row(name, batch, row, frames, floor)
            seconds[name, batch] = row.seconds
            release_decoders(model)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    names = list(variants(cfg.layout.grid[2]))
    ratios = [f"batch {b}: " + ", ".join(f"{n} {seconds[names[2], b] / seconds[n, b]:.1f}x" for n in names[:2])
              for b in args.batch_sizes]
    print("NTP/NBP wall clock: " + "; ".join(ratios), flush=True)


if __name__ == "__main__":
    sys.exit(main())
