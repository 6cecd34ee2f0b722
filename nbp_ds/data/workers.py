"""How every DataLoader in nbp_ds starts its worker processes: from a fork server, never by forking the trainer.

A DataLoader forks its workers from the process that iterates it. In a training process other threads are
running by then (TensorBoard's event writer, gloo's, the pin-memory thread), and ``fork`` copies into the child
every lock those threads hold at that instant, with no thread left to release it: the worker can hang before
its first batch and its rank waits on it forever while the other ranks wait in their next collective. (Seen:
a validation loader, whose workers are started afresh for each validation, forked while the event writer was
writing; the run stopped at step 300 with no error.) The ``forkserver`` method forks each worker from one
single-threaded server process instead, started once per process with torch and the dataset modules already
imported, so a worker still starts in milliseconds and inherits nothing from the trainer's threads.

The price: the dataset is pickled to each worker instead of inherited, so it holds only picklable state (file
names, seeds, positions), and a worker sees the modules as imported, not as patched in the parent. Unlike a
plain forkserver or spawn start, the workers do not import the program's main module again
(:func:`start_workers`): a script that trains through the Python API needs no ``if __name__ == "__main__"``
guard, as it needed none with fork.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import types
from collections.abc import Iterator
from multiprocessing.context import BaseContext

from torch.utils.data import DataLoader

# imported once by the fork server, so each forked worker has them already (a worker unpickles its dataset
# from these modules; importing torch afresh would cost each worker a second or more)
_PRELOAD = ["torch", "nbp_ds.data.loader", "nbp_ds.tokenizer.clip_stream"]


def loader_worker_context() -> BaseContext:
    """The multiprocessing context for ``DataLoader(multiprocessing_context=...)``: the fork server where the
    platform has one, else spawn (never a plain fork of the calling process)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # takes effect when this process first starts its server
    return ctx


def start_workers(loader: DataLoader) -> Iterator:
    """``iter(loader)``, which starts its workers, without the main module in their start-up data.

    A forkserver or spawn child re-imports the parent's main module (a script runs again, top to bottom, as
    ``__mp_main__``) so that objects defined there can be unpickled. A loader worker needs none: its dataset
    and functions live in nbp_ds. Shown a main module with no file and no import name while the workers are
    started, multiprocessing leaves it out, and an unguarded training script is not run again in each
    worker (where it would refuse to start processes while bootstrapping, and the loader would fail)."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        return iter(loader)
    finally:
        sys.modules["__main__"] = main
