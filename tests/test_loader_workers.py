"""Both DataLoaders start their workers from a fork server, never as forks of the training process.

A training process runs other threads while its loaders start workers (TensorBoard's event writer, gloo's,
the pin-memory thread). A forked worker inherits every lock such a thread holds at that instant, locked, with
no thread left to release it: the worker hangs before its first batch and the run stops without an error (a
validation loader forked while the event writer was writing stopped a training run at step 300). The probe
here: a thread of this process holds a lock while the loaders start their workers; a hook run in every child
forked from this process writes down whether the child inherited that lock held.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from video_fixtures import dataset

from nbp_ds.data import TokenShardWriter, build_loader
from nbp_ds.tokenizer.clip_stream import ClipLoader
from nbp_ds.video_io import ClipSpec, find_videos

GRID = (2, 3, 4)
_held_by_a_thread = threading.Lock()
_probe = {"folder": None}  # where forked children report; None: the probe is off (other tests fork too)


def _report_inherited_lock() -> None:
    folder = _probe["folder"]
    if folder is not None:
        Path(folder, str(os.getpid())).write_text("held" if _held_by_a_thread.locked() else "free")


os.register_at_fork(after_in_child=_report_inherited_lock)


@pytest.fixture
def busy_thread(tmp_path):
    """A thread holding a lock for the whole test (as the event writer holds its own mid-write), and the
    folder where forked children report what they inherited."""
    reports = tmp_path / "forked"
    reports.mkdir()
    release, holding = threading.Event(), threading.Event()

    def hold() -> None:
        with _held_by_a_thread:
            holding.set()
            release.wait()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    holding.wait()
    _probe["folder"] = str(reports)
    try:
        yield reports
    finally:
        _probe["folder"] = None
        release.set()
        thread.join()


def write_shards(folder: Path, n: int) -> None:
    """n clips, the first token of clip i being i, four to a shard."""
    with TokenShardWriter(folder, maxcount=4) as writer:
        for i in range(n):
            tokens = np.random.default_rng(i).integers(0, 1000, GRID)
            tokens.flat[0] = i
            writer.write(f"clip{i:05d}", tokens, label=i % 5, meta={"source": f"v{i}.mp4"})


def _child() -> None:
    pass


def test_the_probe_sees_a_plain_fork_inherit_the_held_lock(busy_thread):
    """The control: a child forked from this process does inherit the lock held (the hazard is real here)."""
    child = mp.get_context("fork").Process(target=_child)
    child.start()
    child.join()
    assert [p.read_text() for p in busy_thread.iterdir()] == ["held"]


def test_token_loader_workers_inherit_no_lock_of_the_trainer(busy_thread, tmp_path):
    n = 23
    write_shards(tmp_path / "shards", n)
    for _ in range(2):  # a validation loader starts its workers afresh at each pass
        loader = build_loader(tmp_path / "shards", grid=GRID, batch_size=4, mode="val", num_workers=2)
        ids = sorted(int(i) for b in loader for i in b["tokens"][:, 0, 0, 0])
        assert ids == list(range(n))
    assert [p.read_text() for p in busy_thread.iterdir()] == []


UNGUARDED_SCRIPT = """
import sys
with open(sys.argv[2], "a") as runs:
    runs.write("ran\\n")
from nbp_ds.data import build_loader
loader = build_loader(sys.argv[1], grid=(2, 3, 4), batch_size=4, mode="val", num_workers=2)
print("samples", sum(batch["tokens"].shape[0] for batch in loader))
"""


def test_a_script_without_a_main_guard_runs_once_with_loader_workers(tmp_path):
    """Workers started by a fork server import the main module again, unless nbp_ds leaves it out: a training
    script written without ``if __name__ == "__main__"`` would run again in every worker (and fail there)."""
    write_shards(tmp_path / "shards", 23)
    script, runs = tmp_path / "train.py", tmp_path / "runs.txt"
    script.write_text(UNGUARDED_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "shards"), str(runs)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["samples", "23"]
    assert runs.read_text() == "ran\n"


def test_clip_loader_workers_inherit_no_lock_of_the_trainer(busy_thread, tmp_path):
    videos = [str(p) for p in find_videos(dataset(tmp_path / "videos", classes=2, per_class=2))]
    loader = ClipLoader(videos, clip=ClipSpec(5, 32, 8.0, 1), batch_size=2, seed=0, rank=0, world=1, workers=2)
    try:
        batches = [next(loader) for _ in range(3)]
    finally:
        loader.close()
    assert all(b.shape == (2, 5, 32, 32, 3) for b in batches)
    assert [p.read_text() for p in busy_thread.iterdir()] == []
