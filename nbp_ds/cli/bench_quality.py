"""Next-block (NBP) versus next-token (NTP) prediction at equal training compute, on the quickstart's world.

    nbp-bench-quality --quickstart-out quickstart_out --out bench_quality/
    nbp-bench-quality --quickstart-out quickstart_out --steps 200 --variants row,ntp model.n_layer=2

Trains the same model (the run config's size, --config with key=value overrides) on a finished quickstart's
token shards with the same steps and batch, once per block shape: a row (1x1xW), a frame (1xHxW) and one token
(1x1x1, NTP); each sequence has the same length, so every step costs the same FLOPs. Then samples
--samples-per-class videos of every class from each, drawn as the quickstart draws them (--top-p, --top-k, --cfg-scale),
decodes them with the quickstart's tokenizer and reads them with the class checker. Writes OUT/quality_bench.md
(a table: training FLOPs, final validation loss, shape, direction and colour accuracy with 95% Wilson intervals,
forward passes and milliseconds per sampled video, and each NBP variant's speed-up over NTP),
OUT/quality_bench.json (every validation point and the settings) and OUT/quality_bench.png (validation loss
against training FLOPs). The training runs are kept in OUT/<variant>/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nbp_ds.cli import command, setup_logging
from nbp_ds.cli.options import add_sampling_arguments
from nbp_ds.config import load_config
from nbp_ds.eval.quality_bench import markdown_table, run_bench
from nbp_ds.generate.draw import QUICKSTART_SAMPLING


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quickstart-out", default="quickstart_out",
                   help="a finished quickstart's folder: its shards/ and tokenizer/ (default quickstart_out/)")
    p.add_argument("--out", default="bench_quality", help="output folder (default bench_quality/)")
    p.add_argument("--config", default="quickstart", help="run config of the model (default quickstart)")
    p.add_argument("--steps", type=int,
                   help="training steps of every variant (default: the run config's train.steps, the quickstart's "
                        "1000)")
    p.add_argument("--samples-per-class", type=int, default=8, help="sampled videos per class (default 8)")
    p.add_argument("--nproc", type=int, default=2, help="training processes (default 2)")
    p.add_argument("--variants", default="row,frame,ntp",
                   help="block shapes to compare, comma-separated: row, frame, ntp (default all three)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    add_sampling_arguments(p)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the run config, the same for every variant")
    args = p.parse_intermixed_args(argv)
    if args.steps is None:
        args.steps = load_config(args.config, args.overrides).train.steps
    if args.steps < 1 or args.samples_per_class < 1 or args.nproc < 1:
        p.error("--steps, --samples-per-class and --nproc must be >= 1")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - {"row", "frame", "ntp"})
    if unknown or not args.variants:
        p.error(f"--variants: unknown {unknown or 'empty list'}; choose from row, frame, ntp")
    return args


@command
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    out = Path(args.out)
    results = run_bench(Path(args.quickstart_out), out, args.steps, args.samples_per_class, args.nproc,
                        args.config, args.overrides, args.variants, args.seed,
                        {**QUICKSTART_SAMPLING, "top_k": args.top_k, "top_p": args.top_p,
                         "cfg_scale": args.cfg_scale})
    print(markdown_table(results))
    print(f"\nwrote {out / 'quality_bench.md'}, {out / 'quality_bench.json'}, {out / 'quality_bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
