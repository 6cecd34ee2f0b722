"""Packed against padded training on a mixed dataset: padding fraction and real tokens per second.

The same random clips of several grids are trained once packed into rows of --pack-tokens positions (first fit,
as the packing loader places them; each clip attends only to itself) and once one clip per row, padded to the
longest clip. Each figure is the median time of training on every clip once (one optimizer step per micro-batch
of --micro-batch rows); tokens/s counts the clips' own positions, not padding.

    nbp-bench-packing --config tiny --grids 3x4x4,1x4x4,2x4x8,2x4x4 --clips 64 --pack-tokens 128
    nbp-bench-packing --config ucf101-700m --device cuda --grids 5x16x16,9x16x16,5x16x28 --pack-tokens 4096
"""

from __future__ import annotations

import argparse
import sys

from nbp_ds.cli import command
from nbp_ds.errors import UsageError

HEADER = ("mode", "rows", "row length", "padding", "ms per pass", "real tokens/s")


def parse_grids(text: str) -> list[tuple[int, int, int]]:
    grids = []
    for part in text.split(","):
        sides = part.split("x")
        if len(sides) != 3 or not all(s.isdigit() and int(s) > 0 for s in sides):
            raise UsageError(f"--grids takes token grids TxHxW, comma-separated (3x4x4,2x4x8), got {part!r}")
        grids.append(tuple(int(s) for s in sides))
    return grids


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="run config name or YAML (default tiny)")
    p.add_argument("--grids", default="3x4x4,1x4x4,2x4x8,2x4x4",
                   help="token grids of the mixed dataset, TxHxW, comma-separated (default: four for tiny)")
    p.add_argument("--clips", type=int, default=64, help="clips in the dataset (default 64)")
    p.add_argument("--pack-tokens", type=int, default=128, help="positions per packed row (default 128)")
    p.add_argument("--micro-batch", type=int, default=2, help="rows per optimizer step (default 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "autocast"], help="as nbp-bench-train (default: bf16 on a "
                                                                          "GPU, fp32 on the CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the clips (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes first (default 1)")
    p.add_argument("overrides", nargs="*", help="key=value run-config overrides")
    args = p.parse_intermixed_args(argv)
    grids = parse_grids(args.grids)
    for flag in ("clips", "pack_tokens", "micro_batch", "repeats"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")

    import torch  # local: --help answers before torch loads

    from nbp_ds.config import load_config  # local: --help answers before torch loads
    from nbp_ds.perf.packing_bench import measure, mixed_clips  # local: --help answers before torch loads

    device = torch.device(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    cfg = load_config(args.config, args.overrides)
    clips = mixed_clips(grids, args.clips, cfg.model.vocab_size, cfg.layout.num_classes)
    try:
        rows = measure(cfg, clips, args.pack_tokens, args.micro_batch, device, dtype, args.repeats, args.warmup)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    table = [HEADER, *[(r.mode, r.rows, r.row_length, f"{100 * r.padding_fraction:.1f}%", f"{r.seconds * 1e3:.0f}",
                        f"{r.tokens_per_s:,.0f}") for r in rows]]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(HEADER))]
    print(f"{args.config} on {device} ({dtype}): {args.clips} clips of {args.grids}, attention "
          f"{cfg.model.attention}")
    for r in table:
        print("  ".join(str(v).rjust(w) for v, w in zip(r, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
