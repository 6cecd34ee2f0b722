"""Training videos stored in WebDataset shards: tar files whose samples hold a video member (``KEY.mp4``, or any
of :data:`nbp_ds.video_io.VIDEO_SUFFIXES`) and optionally ``KEY.cls`` / ``KEY.json``.

``data.videos`` names shards when it is a brace pattern, glob or path of ``.tar`` files, a folder holding
``.tar`` files (and no videos) at its top level, a text list whose lines are shard addresses, or a
``pipe:COMMAND`` / ``http(s)://`` URL. The addresses are expanded and read by :mod:`nbp_ds.data.shards`, as
the token loader reads its shards (retries, failed shards counted).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from nbp_ds.data.shards import RetryPolicy, expand_shards, is_local, local_path, scheme_of
from nbp_ds.video_io import VIDEO_SUFFIXES, VideoError

SHARD_SUFFIX = ".tar"


@dataclass(frozen=True)
class VideoShards:
    """Shard addresses of raw videos (expanded) and how a shard that fails is retried."""

    urls: tuple[str, ...]
    policy: RetryPolicy = field(default_factory=RetryPolicy)

    def __len__(self) -> int:
        return len(self.urls)


def _is_shard_address(text: str) -> bool:
    return bool(scheme_of(text)) or local_path(text).endswith(SHARD_SUFFIX)  # URL, pipe:, path/pattern/glob


def names_shards(spec: str | Path) -> bool:
    """Whether a ``data.videos`` value names shards of raw videos rather than video files (see the module)."""
    text = str(spec)
    if _is_shard_address(text):
        return True
    path = Path(local_path(text))
    if path.is_dir():
        top = [p for p in path.iterdir() if not p.name.startswith(".")]
        return any(p.suffix == SHARD_SUFFIX for p in top) and not any(
            p.suffix.lower() in VIDEO_SUFFIXES or p.is_dir() for p in top)
    if path.is_file() and path.suffix.lower() not in (".csv", *VIDEO_SUFFIXES):  # a text list
        return any(_is_shard_address(line) for line in _lines(path)[:1])
    return False


def _lines(path: Path) -> list[str]:
    text = path.read_text(errors="replace")  # a binary file is no list, and must not stop the check
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def expand_video_shards(spec: str | Path, policy: RetryPolicy | None = None) -> VideoShards:
    """The shards a ``data.videos`` value names (a list file's relative paths are relative to it); local shards
    must exist (FileNotFoundError naming what is missing)."""
    text = str(spec)
    path = Path(local_path(text))
    if not _is_shard_address(text) and path.is_file():
        items = [line if not is_local(line) or Path(line).is_absolute() else str(path.parent / line)
                 for line in _lines(path)]
        urls = expand_shards(items)
    else:
        urls = expand_shards(text)
    return VideoShards(tuple(urls), policy or RetryPolicy())


def member_name(url: str, key: str) -> str:
    """How a shard member is named in logs and ``skipped_videos``: ``SHARD#KEY``."""
    return f"{url}#{key}"


def member_id(url: str, key: str) -> int:
    """A stable 64-bit id of a shard member (its clips' randomness is keyed by it, as a file's by its index)."""
    return int.from_bytes(hashlib.sha1(member_name(url, key).encode()).digest()[:8], "little")


def video_member(sample: dict) -> tuple[str, bytes]:
    """(file suffix, bytes) of a sample's video member; VideoError when it has none."""
    for ext, data in sample.items():
        suffix = "." + ext.rsplit(".", 1)[-1].lower()
        if not ext.startswith("__") and suffix in VIDEO_SUFFIXES:
            return suffix, data
    members = sorted(k for k in sample if not k.startswith("__"))
    raise VideoError(member_name(sample["__shard__"], sample["__key__"]),
                     f"no video member ({', '.join(VIDEO_SUFFIXES)}) among {members}")
