"""Writing token shards: each shard is written under a temporary name and renamed when complete
(:func:`nbp_ds.files.atomic_output`), so an interrupted writer never leaves a truncated shard under a
final name."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np
import webdataset as wds

from nbp_ds.data.schema import encode_sample
from nbp_ds.files import atomic_output


class TokenShardWriter:
    """Writes clips into ``{prefix}-{index:06d}.tar`` shards of at most ``maxcount`` samples."""

    def __init__(self, out_dir: str | Path, prefix: str = "shard", maxcount: int = 1000, start_index: int = 0):
        if maxcount < 1:
            raise ValueError(f"maxcount must be >= 1, got {maxcount}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.maxcount, self.index = prefix, maxcount, start_index
        self.written: list[Path] = []  # completed shards
        self._tar: wds.TarWriter | None = None
        self._shard: ExitStack | None = None  # holds the open temporary file until the shard is complete
        self._count = 0

    def shard_path(self, index: int) -> Path:
        return self.out_dir / f"{self.prefix}-{index:06d}.tar"

    def _open(self) -> None:
        self._shard = ExitStack()
        tmp = self._shard.enter_context(atomic_output(self.shard_path(self.index)))
        self._tar = wds.TarWriter(self._shard.enter_context(open(tmp, "wb")))
        self._count = 0

    def finish_shard(self) -> Path | None:
        """Close the current shard and give it its final name."""
        if self._tar is None:
            return None
        self._tar.close()
        self._shard.close()  # closes the file, then renames it into place
        final = self.shard_path(self.index)
        self.written.append(final)
        self._tar, self._shard = None, None
        self.index += 1
        return final

    def write(self, key: str, tokens: np.ndarray, label: int | None, meta: dict) -> None:
        if self._tar is None:
            self._open()
        self._tar.write(encode_sample(key, tokens, label, meta))
        self._count += 1
        if self._count >= self.maxcount:
            self.finish_shard()

    def close(self) -> None:
        self.finish_shard()

    def __enter__(self) -> TokenShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._shard is not None:  # an error: the partial shard is removed, never renamed into place
            self._tar.close()
            self._shard.__exit__(exc_type, exc, tb)
            self._tar, self._shard = None, None
