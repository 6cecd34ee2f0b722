"""One AdamW step per implementation on a ZeRO rank's partition of a model: which AdamW the GPU configs use.

The shipped DeepSpeed configs (zero2, zero3) select torch's fused AdamW ("torch_adam": true, "fused": true);
this times it against torch's multi-tensor (foreach) AdamW and DeepSpeed's FusedAdam on the fp32 flat tensors
one rank of --world-size steps, after checking that all three compute the same update. ``make gpu-check``
runs it on the GPU; its table is the record of the choice.

    nbp-bench-optimizer                                              # CPU: the tiny config, the torch candidates
    nbp-bench-optimizer --device cuda --config ucf101-700m --world-size 8
"""

from __future__ import annotations

import argparse
import sys

from nbp_ds.cli import command


@command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nbp-bench-optimizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="run config whose model is partitioned (default: tiny on the "
                                                   "CPU, ucf101-700m on a GPU)")
    p.add_argument("--world-size", type=int, default=8, help="ranks the parameters are partitioned over (8)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per optimizer; the median is shown (5)")
    args = p.parse_args(argv)
    import torch

    from nbp_ds.config import load_config
    from nbp_ds.errors import UsageError
    from nbp_ds.perf.optimizer_bench import partition_sizes, table, time_optimizers

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible to torch")
    cfg = load_config(args.config or ("ucf101-700m" if device.type == "cuda" else "tiny"))
    sizes = partition_sizes(cfg, args.world_size)
    print(f"{cfg.name}, 1 rank of {args.world_size}")
    print(table(time_optimizers(sizes, device, repeats=args.repeats), sizes, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
