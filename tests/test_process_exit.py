"""A finished rank that ends with ``os._exit`` (nbp_ds.runtime.distributed.end_launched_process) first ends its
DataLoader workers, as the interpreter's exit would: otherwise each worker lives on until its next check of its
parent (every 5 s) and holds the job's stdout/stderr open, so every launcher, pipe or test reading them waits."""

from __future__ import annotations

import subprocess
import sys

from processes import state
from train_helpers import ROOT, env

RANK_THAT_ENDS = """
import multiprocessing
from torch.utils.data import DataLoader
from nbp_ds.runtime import distributed

batches = iter(DataLoader(list(range(64)), batch_size=1, num_workers=2, multiprocessing_context="fork"))
next(batches), next(batches)  # both workers busy a moment ago: their next check of the parent is ~5 s away
print(" ".join(str(child.pid) for child in multiprocessing.active_children()), flush=True)
distributed._left_group_of = 2  # what leave_process_group leaves behind in a rank of a 2-process job
distributed.end_launched_process(0)
"""


def test_a_rank_ended_with_os_exit_leaves_no_dataloader_worker_behind(tmp_path):
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    # files, not pipes: a pipe's reader would wait for the workers to end before the check below
    with out.open("w") as stdout, err.open("w") as stderr:
        result = subprocess.run([sys.executable, "-c", RANK_THAT_ENDS], cwd=ROOT, env=env(), stdout=stdout,
                                stderr=stderr, timeout=120)
    assert result.returncode == 0, err.read_text()[-2000:]
    workers = [int(pid) for pid in out.read_text().split()]
    assert len(workers) == 2
    assert [state(pid) for pid in workers] == [None, None], "a DataLoader worker outlived its rank"
