"""Packing a loader slot's samples into rows of ``data.pack_tokens`` positions (nbp_ds.packing lays them out).

Samples come in the stream's order and each goes into the first row of the batch with room for it (first fit
over the batch's rows). The first sample that fits in no row closes the batch and starts the next one. The
batch is saved with the stream's state from *before* that sample (:attr:`PackedBatch.holds_next`), so a
resumed stream reads it again as its next sample: the straight and the resumed run make the same batches, and
every sample goes into exactly one batch.

A sample longer than a whole row, or of a grid the block shape does not tile, cannot be packed: it is skipped
and counted (``unpackable``, ``bad_shape``). Every batch counts its positions and its padding
(``pack_positions``, ``pack_padding``), from which the trainer logs ``data/padding_fraction``.
"""

from __future__ import annotations

from dataclasses import dataclass

from nbp_ds.data.report import DataReport
from nbp_ds.data.schema import SampleError, decode_sample
from nbp_ds.data.sources import Source
from nbp_ds.errors import ConfigError
from nbp_ds.layout import Layout
from nbp_ds.packing import Clip, clip_length, pack_rows


@dataclass(frozen=True)
class PackSpec:
    """How a loader packs: the run's layout (each clip gets its own grid's) and the positions of a row."""

    layout: Layout
    tokens: int

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ConfigError(f"data.pack_tokens must be a positive number of positions, got {self.tokens}")


class PackedBatch:
    """Decoded clips placed first-fit into ``rows`` rows; ``add`` and ``collate`` as the loader's plain batch."""

    needs_snapshot = True  # the loader keeps the stream's state from before each sample (see the module docstring)

    def __init__(self, spec: PackSpec, rows: int, with_keys: bool):
        self.spec, self.rows, self.with_keys = spec, rows, with_keys
        self.clips: list[list[Clip]] = [[] for _ in range(rows)]
        self.free = [spec.tokens] * rows
        self.keys: list[str] | None = [] if with_keys else None
        self.count = 0
        self.rejected: SampleError | None = None
        self.held: tuple[Clip, int, str, int | None] | None = None  # the clip that closed the batch, for the next

    @property
    def holds_next(self) -> bool:
        """Whether the last sample added fits in no row: the batch is closed, that sample starts the next one."""
        return self.held is not None

    def __len__(self) -> int:
        return self.count

    def complete(self, batch_size: int) -> bool:
        return self.holds_next

    def add(self, sample: dict, grid, sources: list[Source] | None, report: DataReport) -> bool:
        """Decode ``sample`` and place it (or hold it for the next batch); False (counted) when it cannot be
        packed."""
        shard, key = str(sample.get("__shard__")), str(sample.get("__key__"))
        try:
            tokens, label, _ = decode_sample(sample)
            if tokens.ndim != 3:
                raise SampleError(f"sample {key!r}: tokens must be (T, H, W), got shape {tokens.shape}")
            clip = Clip(tokens, label)
            length = clip_length(self.spec.layout, clip.grid)
        except (SampleError, ConfigError) as exc:
            self.rejected = exc if isinstance(exc, SampleError) else SampleError(f"sample {key!r}: {exc}")
            kind = "corrupt" if isinstance(exc, SampleError) else "bad_shape"
            report.problem(kind, f"{shard}: {self.rejected}", place=(shard, key))
            return False
        if length > self.spec.tokens:
            self.rejected = SampleError(f"sample {key!r} of grid {list(clip.grid)} needs {length} positions, more "
                                        f"than data.pack_tokens={self.spec.tokens}")
            report.problem("unpackable", f"{shard}: {self.rejected}", place=(shard, key))
            return False
        source = sample.get("__source__") if sources is not None else None
        self.place(clip, length, key, None if source is None else sources[source].name, report)
        return True

    def place(self, clip: Clip, length: int, key: str, source: str | None, report: DataReport) -> None:
        row = next((r for r, free in enumerate(self.free) if free >= length), None)
        if row is None:
            self.held = (clip, length, key, source)
            return
        self.clips[row].append(clip)
        self.free[row] -= length
        self.count += 1
        if self.keys is not None:
            self.keys.append(key)
        if source is not None:
            report.counts[f"source/{source}"] += 1

    def successor(self, report: DataReport) -> PackedBatch:
        """The next batch, starting with the held clip (if any)."""
        after = PackedBatch(self.spec, self.rows, self.with_keys)
        if self.held is not None:
            after.place(*self.held, report)
        return after

    def collate(self, report: DataReport, state: tuple[int, dict] | None = None) -> dict:
        positions = self.rows * self.spec.tokens
        report.counts["pack_positions"] += positions
        report.counts["pack_padding"] += sum(self.free)
        counts, problems = report.take()
        batch: dict = {**pack_rows(self.spec.layout, self.clips, self.spec.tokens), "clips": self.count,
                       "_counts": counts, "_problems": problems}
        if self.keys is not None:
            batch["key"] = self.keys
        if state is not None:
            batch["_state"] = state
        return batch


def padding_fraction(counts: dict[str, float]) -> float:
    """The share of packed positions that are padding, from the loaders' (summed) counters; 0 when nothing
    was packed."""
    positions = counts.get("pack_positions", 0)
    return float(counts.get("pack_padding", 0)) / positions if positions else 0.0
