"""Export a DeepSpeed checkpoint for sampling on a single machine: one safetensors file, or shards with an index.

    nbp-export runs/ucf101-700m runs/ucf101-700m/export.safetensors
    nbp-export runs/x/checkpoints OUT.safetensors --tag step00010000 --dtype bf16
    nbp-export runs/ucf101-700m runs/ucf101-700m/ema.safetensors --ema      (train.ema > 0: the averaged weights)
    nbp-export runs/ucf101-3b runs/ucf101-3b/export --shard-size 5GB        (a folder: shards + index + config)
    nbp-export runs/ucf101-3b/export.safetensors runs/ucf101-3b/export --shard-size 5GB   (an export, resharded)

CHECKPOINT is a training output folder, its checkpoints/ folder, or one tag folder; by default the
tag that 'latest' names. It may also be an export in either form, written again in the form asked for.
Writes OUT (weights + the run config as metadata) and OUT with .json; with --shard-size, the folder OUT
in the Hugging Face layout: model-00001-of-0000N.safetensors ..., model.safetensors.index.json (its
weight_map names each tensor's shard) and config.json (the run config).
Load either with nbp_ds.weights.export.load_exported(OUT), nbp-sample --weights OUT, or train.init_from=OUT.
"""

from __future__ import annotations

import argparse
import json
import sys

from nbp_ds.cli import command, setup_logging


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="training output folder, checkpoints folder, or tag folder")
    parser.add_argument("out", help="output .safetensors file (with --shard-size: an output folder)")
    parser.add_argument("--tag", help="checkpoint tag (default: the one 'latest' names)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--ema", action="store_true",
                        help="export the moving average of the weights (a run trained with train.ema > 0)")
    parser.add_argument("--shard-size", metavar="SIZE",
                        help="write OUT as a folder of shards of at most SIZE each (5GB, 500MB, 2GiB) with an index")
    args = parser.parse_args(argv)
    setup_logging(fmt="%(message)s")
    from nbp_ds.weights.export import export  # local: --help answers before torch loads
    from nbp_ds.weights.files import output_shard_bytes  # local: --help answers before torch loads

    shard_bytes = output_shard_bytes(args.out, args.shard_size)
    out = export(args.checkpoint, args.out, dtype=args.dtype, tag=args.tag, ema=args.ema, shard_bytes=shard_bytes)
    if shard_bytes is None:
        print(f"wrote {out} and {out.with_suffix('.json')}")
    else:
        shards = len(set(json.loads(out.read_text())["weight_map"].values()))
        print(f"wrote {shards} shard{'s' * (shards != 1)}, {out.name} and config.json in {out.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
