"""Fault injection for the tests, through the trainer's hook seam (nbp_ds.runtime.hooks).

A test adds ``train.hooks=faults:FaultHooks`` to a training command (tests/ is on PYTHONPATH) and sets
``NBP_FAULTS`` to a JSON object of the faults to inject. Only this test module reads that variable:

    nan_steps       [3, 4]   poison the loss of these steps (1-based) with NaN
    step_sleep      0.2      sleep after each step, so a test can interrupt a run midway
    stall_ranks     [1]      these ranks stop after writing their part of a checkpoint, before the barrier
                             that lets 'latest' move ([] or absent: none; "all" for every rank) ...
    stall_at        "step00000010"   ... of this checkpoint tag only (absent: every checkpoint)
    stall_marker    "/tmp/x" ... announce the stall by creating this file (with the rank in its name)
    release_file    "/tmp/y" ... and wait until this file exists (absent: forever, until killed)
    enospc_ranks    [1]      on these ranks the first file DeepSpeed writes of a checkpoint fails with ENOSPC (a
                             full disk) ...
    enospc_at       "step00000010"   ... of this checkpoint tag only (absent: every checkpoint)
    crash_at_step   7        every rank raises at the end of this step, at every attempt (a deterministic bug)

Tokenization's decoding faults (decode_kill, decode_hang, decode_pids: see decode_with_faults) come from the same
variable, in a run of ``python tests/faults.py tokenize-faults NBP-TOKENIZE-ARGS...``.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from pathlib import Path

import torch

from nbp_ds.runtime.hooks import TrainerHooks
from nbp_ds.tokenizer import pipeline  # imported with this module, as a worker imports the real decoding: untimed


class FaultHooks(TrainerHooks):
    def __init__(self):
        self.faults = json.loads(os.environ.get("NBP_FAULTS", "{}"))

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step in self.faults.get("nan_steps", []) else loss

    def on_step_end(self, step: int) -> None:
        if step == self.faults.get("crash_at_step"):
            raise RuntimeError(f"fault injected at step {step}")
        if self.faults.get("step_sleep"):
            time.sleep(float(self.faults["step_sleep"]))

    def on_checkpoint_file(self, path: str, rank: int) -> None:
        tag = Path(path).parent.name
        if rank in self.faults.get("enospc_ranks", []) and self.faults.get("enospc_at", tag) == tag:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

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

    decode = pipeline._decode

    def slow(job):
        time.sleep(decode_sleep)
        return decode(job)

    pipeline._decode = slow
    return tokenize.main(argv)


_unfaulted_decode = None  # the pipeline's own decoding, kept by tokenize_with_faults (decoding in this process)


def decode_with_faults(job):
    """The tokenizer pipeline's decoding of one video, with the decode faults of ``NBP_FAULTS`` for the videos they
    name (paths relative to --videos). Spawned decoding workers import it by name, so the faults happen in them:

        decode_kill   ["class0/v01.mp4"]  the worker kills itself with SIGKILL (as a decoder crash or the OOM killer)
        decode_hang   ["class0/v02.mp4"]  the decoding never returns (sleeps for an hour)
        decode_sleep  {"class0/v02.mp4": 2}  the decoding starts this many seconds late
        decode_pids   "/tmp/pids"         each decoding first writes its process id to a file in this folder,
                                          named after the video, so a test can check that no process outlived it
        kill_when     ["class0/v02.mp4"]  ... and decode_kill waits until these videos are being decoded (their
                                          decode_pids files exist), so that they are in flight when it strikes
    """
    entry, _ = job
    faults = json.loads(os.environ.get("NBP_FAULTS", "{}"))
    pids = Path(faults.get("decode_pids", "."))
    if faults.get("decode_pids"):
        Path(pids, entry.rel.replace("/", "__")).write_text(str(os.getpid()))
    if entry.rel in faults.get("decode_kill", []):
        deadline = time.monotonic() + 60
        while not all((pids / rel.replace("/", "__")).exists() for rel in faults.get("kill_when", [])):
            assert time.monotonic() < deadline, f"{faults['kill_when']} never started decoding"
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(faults.get("decode_sleep", {}).get(entry.rel, 0))
    if entry.rel in faults.get("decode_hang", []):
        time.sleep(3600)
    return (_unfaulted_decode or pipeline._decode)(job)


def tokenize_with_faults(argv: list[str]) -> int:
    """``nbp-tokenize argv`` with decode_with_faults decoding each video (in the workers, or inline)."""
    global _unfaulted_decode
    from nbp_ds.cli import tokenize

    _unfaulted_decode, pipeline._decode = pipeline._decode, decode_with_faults
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


if __name__ == "__main__":  # python tests/faults.py tokenize|sample SECONDS PROGRAM-ARGS... | tokenize-faults ARGS...
    import sys

    if sys.argv[1] == "tokenize-faults":
        sys.exit(tokenize_with_faults(sys.argv[2:]))
    slowed = {"tokenize": tokenize_slowly, "sample": sample_slowly}
    assert sys.argv[1] in slowed, "usage: faults.py tokenize|sample SECONDS ARGS..."
    sys.exit(slowed[sys.argv[1]](float(sys.argv[2]), sys.argv[3:]))
