"""The training data as sources: one set of shards, or a weighted mixture of several.

``data.train`` is either shards (a folder, pattern, URL, ``pipe:`` command, or a list of those: one
source named ``train``) or a list of ``{shards: SPEC, weight: W, name: NAME}`` entries (a mixture: every
sample a loader slot yields is drawn from entry *i* with probability W_i / sum(W); ``name`` defaults to
``source<i>`` and names the TensorBoard figure ``data/source/<name>``). The structure is checked by
:func:`nbp_ds.config.check_shard_spec`, with errors naming the key.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from nbp_ds.config import check_shard_spec
from nbp_ds.data.shards import expand_shards


@dataclass(frozen=True)
class Source:
    """One data source: its name, its shard addresses (expanded) and its mixture weight."""

    name: str
    shards: tuple[str, ...]
    weight: float = 1.0


def parse_sources(spec, key: str = "data.train") -> list[Source]:
    """``data.train`` -> its sources, shards expanded (FileNotFoundError naming the entry whose local
    shards are missing); ValueError (a ConfigError) for a malformed mixture."""
    spec = _plain(spec)
    entries = check_shard_spec(spec, key, mixture_allowed=True)
    if entries is None:
        return [Source("train", tuple(expand_shards(spec)))]
    sources = []
    for i, entry in enumerate(entries):
        try:
            shards = expand_shards(entry["shards"])
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{key}[{i}].shards: {exc}") from exc
        sources.append(Source(entry.get("name") or f"source{i}", tuple(shards), float(entry.get("weight", 1.0))))
    return sources


def _plain(spec):
    """Paths (``pathlib.Path``) as strings, in lists too: what a caller in Python may hand over."""
    if isinstance(spec, os.PathLike):
        return os.fspath(spec)
    if isinstance(spec, (list, tuple)):
        return [_plain(item) for item in spec]
    return spec


def as_sources(spec) -> list[Source]:
    """Sources from whatever a caller holds: a list of :class:`Source`, or a ``data.train`` value."""
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(s, Source) for s in spec):
        return list(spec)
    if isinstance(spec, Source):
        return [spec]
    return parse_sources(spec)


def fingerprint(sources: list[Source]) -> str:
    """A short digest of the sources' names and shard lists: a saved stream position applies only to the
    same shards (weights may change; the position in each source stays meaningful)."""
    text = json.dumps([[s.name, list(s.shards)] for s in sources])
    return hashlib.sha1(text.encode()).hexdigest()[:16]
