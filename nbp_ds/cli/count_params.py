"""Print the parameter counts of the paper's model presets (or of any run config).

    nbp-count-params                     # the 700M, 1.2B and 3B presets
    nbp-count-params --config tiny model.n_layer=4

Models are built on the meta device, so even 3B costs no memory.
"""

from __future__ import annotations

import argparse
import sys

from nbp_ds.cli import command
from nbp_ds.config import load_config
from nbp_ds.model import PAPER_PRESETS, PRESET_CONFIGS, build_model


def measure(config: str, overrides: list[str]) -> dict:
    cfg = load_config(config, overrides)
    model = build_model(cfg, device="meta")
    return {
        "config": cfg.name, "layers": cfg.model.n_layer, "width": cfg.model.d_model, "heads": cfg.model.n_head,
        "total": model.num_params(), "non_embedding": model.num_params(exclude_embeddings=True),
        "flops_per_token": model.flops_per_token(),
    }


@command
def main(argv: list[str] | None = None) -> int | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a run config name or YAML path (default: the paper's presets)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for --config")
    args = parser.parse_intermixed_args(argv)
    rows = ([measure(args.config, args.overrides)] if args.config else
            [dict(measure(PRESET_CONFIGS[name], []), preset=name) for name in PAPER_PRESETS])
    print(f"{'preset':>7} {'config':>14} {'layers':>6} {'width':>6} {'heads':>5} {'total':>10} "
          f"{'non-embed':>10} {'GFLOP/token':>11}")
    for r in rows:
        print(f"{r.get('preset', '-'):>7} {r['config']:>14} {r['layers']:>6} {r['width']:>6} {r['heads']:>5} "
              f"{r['total'] / 1e6:>9.1f}M {r['non_embedding'] / 1e6:>9.1f}M {r['flops_per_token'] / 1e9:>11.2f}")


if __name__ == "__main__":
    sys.exit(main())
