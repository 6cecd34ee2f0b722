"""Writing files so that a crash never leaves a half-written one under its final name.

Every writer of a result (checkpoints' ``latest``, exports, tokenizer weights, manifests, shards,
synthetic videos, caches) goes through :func:`atomic_output`: it hands out a temporary path next to
the target (same folder, hence same file system), and renames it over the target only when the block
finished without an error. The temporary name is hidden (a leading dot) and does not end like the
target (``.shard-000001.tar.tmp123``), so listings of shards or videos never pick one up; a writer
that chooses its format by suffix (ffmpeg, ``np.save``) passes ``suffix``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: str | Path, suffix: str = "", fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write (ending in ``suffix``); on success it becomes ``path`` (fsynced
    first), on an error it is removed and ``path`` keeps what it held before."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path``'s content with ``text`` all at once."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
