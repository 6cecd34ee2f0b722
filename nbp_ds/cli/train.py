"""Train an NBP model with DeepSpeed.

    nbp-train --config tiny data.train=shards/train data.val=shards/val train.out_dir=runs/tiny
    torchrun --nproc_per_node 8 -m nbp_ds.train --config ucf101-700m data.train=... train.out_dir=...
    deepspeed --hostfile hostfile -m nbp_ds.train --config ucf101-700m ...      (passes --local_rank)
    srun python -m nbp_ds.train --config ucf101-3b ...                         (see slurm/train.sbatch)

nbp-train --dry-run --world-size 64 --config ucf101-3b data.train=...    (checks it all here, launches nothing)

--config is a shipped config name (tiny, quickstart, ucf101-700m, ucf101-1.2b, ucf101-3b, k600-700m)
or a YAML file; key=value arguments override it (values are YAML: train.lr=3e-4, layout.block=[1,1,16]).
A run whose train.out_dir holds a checkpoint resumes from it; --resume PATH resumes from another. The
data stream continues where it stopped (seeking, nothing trained on is read again). A checkpoint saved by
another number of processes is converted once into DeepSpeed's universal format (into its tag folder,
<tag>/universal) and loaded from there; --universal does so whatever the number.
SIGTERM or SIGUSR1 saves a checkpoint at the next step boundary and exits 0. A resume checks the checkpoint
against its manifest and falls back to the newest intact one. A hang becomes an error: a collective waits at
most train.collective_timeout_s, and a rank with no finished step for max(train.stall_timeout_s,
train.stall_factor x the median step time) dumps its threads' stacks and exits 3 (slurm/train.sbatch requeues).
On CPU set DS_ACCELERATOR=cpu (DeepSpeed then uses gloo).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from nbp_ds.cli import command, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbp-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config name or YAML path")
    parser.add_argument("--resume", help="checkpoint to resume from: a run folder, its checkpoints/ folder or a tag "
                                         "folder (default: train.out_dir's own latest)")
    parser.add_argument("--universal", action="store_true", default=None,
                        help="load the checkpoint through DeepSpeed's universal format, converting it once into "
                             "<tag>/universal (default: only when it was saved by another number of processes)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved run config and DeepSpeed JSON (for --world-size processes) and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the run for --world-size processes in this one process, launching nothing: the "
                             "resolved configs, the parameter count, model-state memory per rank under ZeRO-2/3 and "
                             "offload, one batch read and one optimizer step; exit 0, or 2 naming the problem")
    parser.add_argument("--world-size", type=int,
                        help="processes the job will have, for --dry-run and --print-config (default: the launcher's "
                             "WORLD_SIZE / SLURM_NTASKS, else 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8,
                        help="GPUs per node, for --dry-run's memory estimates (default 8)")
    parser.add_argument("--local_rank", "--local-rank", type=int, dest="local_rank",
                        help="set by the deepspeed launcher; LOCAL_RANK in the environment wins")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=1000")
    return parser


@command
def main(argv: list[str] | None = None) -> int:
    # intermixed: overrides may come before or after --resume / --config
    args = build_parser().parse_intermixed_args(argv)
    from nbp_ds.runtime.stop import stop_request

    stop_request()  # before the slow start-up: a SIGUSR1 during it is remembered, not fatal
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    setup_logging(ranked=True)
    # DeepSpeed's ZeRO calls torch collectives that torch has deprecated; left alone, each rank prints the
    # same two warnings at every step, burying the training log
    for deprecated in ("reduce_scatter_tensor", "all_gather_into_tensor"):
        warnings.filterwarnings("ignore", message=f".*{deprecated}.* is deprecated", category=FutureWarning)
    from nbp_ds.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config or args.dry_run:
        from nbp_ds.perf.dry_run import config_text, dry_run
        from nbp_ds.runtime.launch import detect
        from nbp_ds.train.ds_config import resolved_configs

        world = args.world_size or detect().world_size
        if args.dry_run:
            checked = dry_run(*resolved_configs(cfg, world), world, args.gpus_per_node)
            print(config_text(checked.cfg, checked.ds_config, world) + checked.report())
        else:
            print(config_text(*resolved_configs(cfg, world), world), end="")
        return 0
    from nbp_ds.runtime import distributed
    from nbp_ds.runtime.hooks import HookChain, load_hooks
    from nbp_ds.sample_log import SampleLogger
    from nbp_ds.train.loop import train

    hooks = HookChain([load_hooks(cfg.train.hooks), SampleLogger()])  # train.hooks, then sample videos
    status = train(cfg, resume=args.resume, universal=args.universal, hooks=hooks)
    return distributed.end_launched_process(status)  # a finished rank of a job ends here (see there why)


if __name__ == "__main__":
    sys.exit(main())
