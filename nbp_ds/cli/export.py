"""Export a DeepSpeed checkpoint as one safetensors file for sampling on a single machine.

    nbp-export runs/ucf101-700m runs/ucf101-700m/export.safetensors
    nbp-export runs/x/checkpoints OUT.safetensors --tag step00010000 --dtype bf16
    nbp-export runs/ucf101-700m runs/ucf101-700m/ema.safetensors --ema      (train.ema > 0: the averaged weights)

CHECKPOINT is a training output folder, its checkpoints/ folder, or one tag folder; by default the
tag that 'latest' names. Writes OUT (weights + the run config as metadata) and OUT with .json.
Load it with nbp_ds.train.export.load_exported(OUT) or nbp-sample --weights OUT.
"""

from __future__ import annotations

import argparse
import sys

from nbp_ds.cli import command, setup_logging


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="training output folder, checkpoints folder, or tag folder")
    parser.add_argument("out", help="output .safetensors file")
    parser.add_argument("--tag", help="checkpoint tag (default: the one 'latest' names)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--ema", action="store_true",
                        help="export the moving average of the weights (a run trained with train.ema > 0)")
    args = parser.parse_args(argv)
    setup_logging(fmt="%(message)s")
    from nbp_ds.train.export import export

    out = export(args.checkpoint, args.out, dtype=args.dtype, tag=args.tag, ema=args.ema)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
