"""Fault injection for the tests, through the trainer's hook seam (nbp_ds.train.hooks).

A test adds ``train.hooks=faults:FaultHooks`` to a training command (tests/ is on PYTHONPATH) and sets
``NBP_FAULTS`` to a JSON object of the faults to inject. Only this test module reads that variable:

    nan_steps       [3, 4]   poison the loss of these steps (1-based) with NaN
    step_sleep      0.2      sleep after each step, so a test can interrupt a run midway
    stall_ranks     [1]      these ranks stop after writing their part of a checkpoint, before the barrier
                             that lets 'latest' move ([] or absent: none; "all" for every rank) ...
    stall_at        "step00000010"   ... of this checkpoint tag only (absent: every checkpoint)
    stall_marker    "/tmp/x" ... announce the stall by creating this file (with the rank in its name)
    release_file    "/tmp/y" ... and wait until this file exists (absent: forever, until killed)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from nbp_ds.train.hooks import TrainerHooks


class FaultHooks(TrainerHooks):
    def __init__(self):
        self.faults = json.loads(os.environ.get("NBP_FAULTS", "{}"))

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step in self.faults.get("nan_steps", []) else loss

    def on_step_end(self, step: int) -> None:
        if self.faults.get("step_sleep"):
            time.sleep(float(self.faults["step_sleep"]))

    def on_checkpoint_written(self, tag: str, rank: int) -> None:
        ranks = self.faults.get("stall_ranks", [])
        if not (ranks == "all" or rank in ranks) or self.faults.get("stall_at", tag) != tag:
            return
        if self.faults.get("stall_marker"):
            Path(f"{self.faults['stall_marker']}.rank{rank}").touch()
        release = self.faults.get("release_file")
        while release is None or not Path(release).exists():
            time.sleep(0.05)


def tokenize_slowly(decode_sleep: float, argv: list[str]) -> int:
    """``nbp-tokenize argv`` with each video's decoding slowed down, so a test can kill the run midway.
    Decoding must run in this process (``--workers 0``) for the slow-down to apply."""
    from nbp_ds.cli import tokenize
    from nbp_ds.tokenizer import pipeline

    decode = pipeline._decode

    def slow(job):
        time.sleep(decode_sleep)
        return decode(job)

    pipeline._decode = slow
    return tokenize.main(argv)


def sample_slowly(write_sleep: float, argv: list[str]) -> int:
    """``nbp-sample argv`` with each video's writing slowed down, so a test can kill the run midway."""
    from nbp_ds.cli import sample
    from nbp_ds.generate import folder

    write = folder.VideoWriter._write

    def slow(self, *args):
        time.sleep(write_sleep)
        return write(self, *args)

    folder.VideoWriter._write = slow
    return sample.main(argv)


if __name__ == "__main__":  # python tests/faults.py tokenize|sample SECONDS PROGRAM-ARGS...
    import sys

    slowed = {"tokenize": tokenize_slowly, "sample": sample_slowly}
    assert sys.argv[1] in slowed, "usage: faults.py tokenize|sample SECONDS ARGS..."
    sys.exit(slowed[sys.argv[1]](float(sys.argv[2]), sys.argv[3:]))
