"""Writing token shards: each shard is written under a temporary name and renamed when complete, so
an interrupted writer never leaves a truncated shard under a final name."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import webdataset as wds

from nbp_ds.data.schema import encode_sample


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
        self._stream = None
        self._count = 0

    def shard_path(self, index: int) -> Path:
        return self.out_dir / f"{self.prefix}-{index:06d}.tar"

    def _open(self) -> None:
        self._tmp = self.shard_path(self.index).with_suffix(".tar.tmp")
        self._stream = open(self._tmp, "wb")
        self._tar = wds.TarWriter(self._stream)
        self._count = 0

    def finish_shard(self) -> Path | None:
        """Close the current shard and give it its final name."""
        if self._tar is None:
            return None
        self._tar.close()
        self._stream.close()
        final = self.shard_path(self.index)
        os.replace(self._tmp, final)
        self.written.append(final)
        self._tar = None
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
        elif self._tar is not None:  # an error: keep the partial shard out of the final names
            self._tar.close()
            self._stream.close()
            os.unlink(self._tmp)
            self._tar = None
