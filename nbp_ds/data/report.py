"""What a shard reader met on its way: counters and the first problems, by name.

Each reader (one loader slot, one inspection) keeps a :class:`DataReport`. Counters count every event;
a problem (a corrupt member, a shard given up) is also logged once per place and kept, up to a cap, as a
line that names the shard and member, for the end-of-run summary. Loader workers send what changed since
their last batch (:meth:`DataReport.take`) to the main process, which adds it up (:meth:`DataReport.add`).
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger(__name__)

# the counters every loader reports (TensorBoard data/<name>, summed over ranks), besides data/source/<name>
COUNTERS = ("samples", "batches", "corrupt", "bad_shape", "failed_shards", "shard_retries",
            "unpackable", "pack_positions", "pack_padding")  # the last three: packed loaders (nbp_ds.data.packer)
MAX_PROBLEMS = 20


class DataReport:
    """Counters (``corrupt``, ``bad_shape``, ``failed_shards``, ``shard_retries``, ...) and the first
    :data:`MAX_PROBLEMS` distinct problem lines."""

    def __init__(self, cap: int = MAX_PROBLEMS):
        self.counts: Counter = Counter()
        self.problems: list[str] = []
        self.cap = cap
        self._warned: set[tuple[str, str]] = set()
        self._new: list[str] = []

    def problem(self, kind: str, text: str, place: object = None) -> None:
        """Count one ``kind`` event (``text`` names the shard and what is wrong); the first time this reader
        meets it at ``place`` (default: the text), log it and keep the line. The endless train stream meets
        the same bad member every epoch: one warning, every occurrence counted."""
        self.counts[kind] += 1
        place = text if place is None else place
        if (kind, place) in self._warned:
            return
        self._warned.add((kind, place))
        log.warning("skipping %s (%s; warned once, every occurrence is counted)", text, kind)
        self._keep(f"[{kind}] {text}")

    def _keep(self, line: str) -> None:
        if len(self.problems) < self.cap and line not in self.problems:
            self.problems.append(line)
            self._new.append(line)

    def take(self) -> tuple[dict[str, int], list[str]]:
        """The counts and problem lines gathered since the last call (a worker's delta for its next batch)."""
        counts, new = dict(self.counts), self._new
        self.counts, self._new = Counter(), []
        return counts, new

    def add(self, counts: dict[str, int], problems: list[str]) -> None:
        """Add a delta that :meth:`take` made elsewhere (in a loader worker)."""
        self.counts.update(counts)
        for line in problems:
            self._keep(line)


def summarize(per_rank: list[tuple[dict[str, int], list[str]]], cap: int = MAX_PROBLEMS) -> str | None:
    """One paragraph over all ranks' (counts, problem lines): the problem counters and the first ``cap``
    lines; None when nothing went wrong."""
    totals: Counter = Counter()
    lines: list[str] = []
    for counts, problems in per_rank:
        totals.update(counts)
        lines += [p for p in problems if p not in lines]
    kinds = [k for k in ("corrupt", "bad_shape", "failed_shards", "shard_retries") if totals.get(k)]
    if not kinds:
        return None
    head = ", ".join(f"{totals[k]} {k.replace('_', ' ')}" for k in kinds)
    shown = lines[:cap]
    more = f"\n  ... and {len(lines) - cap} more" if len(lines) > cap else ""
    return f"data problems over all ranks: {head}" + "".join(f"\n  {line}" for line in shown) + more
