"""Stands in for the trainer in slurm/train.sbatch (NBP_TRAIN_MODULE=tests.slurm_probe, a CPU job): each srun task
writes what it sees of the cores it was given into <train.out_dir>/cores-rank<R>.json, then rank 0 marks the run
finished so that the script ends the job instead of requeueing it. Takes train.sbatch's arguments and ignores
all but train.out_dir."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    out = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("train.out_dir=")))
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("SLURM_PROCID", "0"))
    seen = {"affinity": sorted(os.sched_getaffinity(0)),  # the CPUs the kernel lets this process run on
            "cpus_on_node": os.environ.get("SLURM_CPUS_ON_NODE"),  # srun: the step's CPUs on this node
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    (out / f"cores-rank{rank}.json").write_text(json.dumps(seen))
    if rank == 0:
        (out / "finished").write_text("")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
