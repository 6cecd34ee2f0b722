"""A layout's generation steps as index tables on the device, grouped by the shape of their pass.

A pass is described by what it feeds (the sequence positions), what it reads (the rows of its output whose
logits are sampled) and where the sampled tokens go (their raster index in the video). Passes of the same
shape, (positions fed, tokens read, cache slots attended), form a group whose tables stack one row per step:
a static decoder runs each group's pass with the step's row picked on the device, so NBP decoding needs only
a handful of distinct passes (the prefix pass, the one-token passes of a hybrid layout, the block passes, times
the cache lengths they attend over).

Attention over a growing cache is made static by bucketing: a pass attends over the first ``kv`` slots, ``kv``
the end of its last fed block rounded up to a multiple of ``kv_bucket`` (at most the cache length), under the
layout's block-causal rule; slots not written yet belong to later blocks and are masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nbp_ds.layout import Layout

DEFAULT_KV_BUCKET = 256  # cache slots per attention length bucket: 6 lengths for the paper's 1281 positions
KV_ALIGN = 16  # the cache length is a multiple of this: aligned mask rows for the memory-efficient SDPA kernel


@dataclass(frozen=True)
class StepShape:
    """The shape of a decoding pass: positions fed, tokens read, cache slots attended."""

    fed: int
    read: int
    kv: int


@dataclass
class StepGroup:
    """Every generation step of one shape, as tables with a row per step (on the plan's device)."""

    shape: StepShape
    positions: torch.Tensor  # [steps, fed] sequence positions fed
    read_rows: torch.Tensor  # [steps, read] rows of the pass's output that are sampled
    targets: torch.Tensor  # [steps, read] raster index of the video token each sampled row gives


@dataclass(frozen=True)
class PlannedStep:
    start: int  # first position fed (the eager decoder slices [start, end))
    end: int
    group: int  # index into DecodePlan.groups
    row: int  # this step's row in the group's tables


class DecodePlan:
    """The generation steps of ``layout`` as device tables (built once per layout, device and bucket size)."""

    def __init__(self, layout: Layout, device: torch.device, kv_bucket: int = DEFAULT_KV_BUCKET):
        if kv_bucket < 1:
            raise ValueError(f"kv_bucket must be >= 1, got {kv_bucket}")
        self.layout, self.device, self.kv_bucket = layout, device, kv_bucket
        self.cache_len = -(-layout.seq_len // KV_ALIGN) * KV_ALIGN
        rows: dict[StepShape, list[tuple[list[int], list[int], list[int]]]] = {}
        order: list[tuple[int, int, StepShape, int]] = []
        target = layout.target_index
        for step in layout.generation_steps:
            kv = min(-(-step.end // kv_bucket) * kv_bucket, self.cache_len)
            shape = StepShape(step.end - step.start, len(step.read), kv)
            group = rows.setdefault(shape, [])
            order.append((step.start, step.end, shape, len(group)))
            group.append((list(range(step.start, step.end)), [p - step.start for p in step.read],
                          [int(target[p]) for p in step.read]))
        shapes = list(rows)
        self.groups = [self._group(shape, rows[shape]) for shape in shapes]
        self.steps = tuple(PlannedStep(start, end, shapes.index(shape), row) for start, end, shape, row in order)
        # block id per cache slot; padding slots get an id above every query's, so they are never visible
        ids = np.full(self.cache_len, np.iinfo(np.int64).max, dtype=np.int64)
        ids[: layout.seq_len] = layout.block_ids
        self.block_ids = torch.from_numpy(ids).to(device)

    def _group(self, shape: StepShape, rows: list[tuple[list[int], list[int], list[int]]]) -> StepGroup:
        def table(i: int) -> torch.Tensor:
            return torch.tensor([r[i] for r in rows], dtype=torch.long).to(self.device)

        return StepGroup(shape, table(0), table(1), table(2))

    def attention_mask(self, positions: torch.Tensor, kv: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [n, kv] for queries at ``positions``: 0 where the layout's rule lets the query see the slot
        (block_id(k) <= block_id(q); slots not written yet are in later blocks), -inf elsewhere."""
        keys = self.block_ids[:kv]
        visible = keys.unsqueeze(0) <= self.block_ids.index_select(0, positions).unsqueeze(1)
        zero = torch.zeros((), dtype=dtype, device=positions.device)
        return torch.where(visible, zero, torch.full_like(zero, float("-inf")))

    def __len__(self) -> int:
        return len(self.steps)
