"""Packed rows: several clips of any trained shape in one sequence of a fixed length, each with its own layout.

A run's layout (nbp_ds.layout) describes one grid. A clip of another grid gets the same layout with its own grid
(:func:`clip_layout`): its own blocks, hybrid first block, condition tokens and 3D positions starting at zero.
:func:`pack_rows` lays such clips one after another in rows of ``length`` positions and gives, per position,
what the model needs (the packed-batch keys below):

* ``packed_ids``  [B, S] model input ids (embedding rows); padding reads row 0;
* ``targets``     [B, S] the video token each position predicts, -100 where nothing counts (condition, padding,
                  given context frames);
* ``positions``   [B, S, 3] the (t, h, w) rotary position, each clip's own;
* ``block_ids``   [B, S] each clip's own block ids;
* ``clip_ids``    [B, S] which clip of its row a position belongs to; padding is one more clip of its own (it
                  attends only to itself, so no row of the mask is empty and nothing real sees it);
* ``loss_rows``   [n] the flat indices (row * S + position) of the positions whose targets count, made on the
                  host so the model never asks the device how many there are;
* ``clip_positions`` the number of positions that are no padding (an int: tokens/s counts these).

Attention in a packed row: q sees k iff clip_id(k) == clip_id(q) and block_id(k) <= block_id(q).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from nbp_ds.errors import ConfigError
from nbp_ds.layout import Layout

PACKED_KEYS = ("packed_ids", "targets", "positions", "block_ids", "clip_ids", "loss_rows")
IGNORE = -100  # the target of a position outside the loss (cross-entropy's ignore index)


@dataclass(frozen=True)
class Clip:
    """One sample to pack: video tokens (T, H, W) and its class label (class-conditional layouts)."""

    tokens: np.ndarray
    label: int | None = None

    @property
    def grid(self) -> tuple[int, int, int]:
        t, h, w = self.tokens.shape
        return int(t), int(h), int(w)


def is_packed(batch: dict) -> bool:
    """Whether a batch is packed rows (:func:`pack_rows`) rather than ``{"tokens", "label"}`` of one grid."""
    return "packed_ids" in batch


@lru_cache(maxsize=256)
def clip_layout(layout: Layout, grid: tuple[int, int, int]) -> Layout:
    """The run's layout for a clip of ``grid``: every rule the same, the grid its own. A grid the block shape
    does not tile is refused, naming both."""
    if not layout.token_ids == "nbp_ds":
        raise ConfigError("packed training (data.pack_tokens) needs layout.token_ids=nbp_ds: the released "
                          "sequences (official) have one fixed grid")
    try:
        return dataclasses.replace(layout, grid=tuple(int(g) for g in grid))
    except ConfigError as exc:
        raise ConfigError(f"a clip of grid {list(grid)} cannot be packed with layout.block={list(layout.block)}: "
                          f"{exc}") from exc


def clip_length(layout: Layout, grid: tuple[int, int, int]) -> int:
    """Sequence positions a clip of ``grid`` takes in a packed row."""
    return clip_layout(layout, tuple(grid)).seq_len


def clip_tables(layout: Layout, clip: Clip) -> dict[str, np.ndarray]:
    """One clip's input ids, targets, positions and block ids under its own layout (numpy, one per position)."""
    own = clip_layout(layout, clip.grid)
    tokens = torch.from_numpy(np.ascontiguousarray(clip.tokens, dtype=np.int64))[None]
    label = None
    if own.prefix_len:
        if clip.label is None or clip.label < 0:
            raise ValueError(f"layout.condition={own.condition} needs a class label for every packed clip, "
                             f"got {clip.label}")
        label = own.check_labels(torch.tensor([clip.label]))
    return {"packed_ids": own.input_ids(tokens, label)[0].numpy(), "targets": own.targets(tokens)[0].numpy(),
            "positions": own.positions, "block_ids": own.block_ids}


def pack_rows(layout: Layout, rows: Sequence[Sequence[Clip]], length: int) -> dict[str, torch.Tensor]:
    """Clips laid out one after another in ``len(rows)`` rows of ``length`` positions (the keys of the module
    docstring). A row whose clips need more than ``length`` positions is refused."""
    b = len(rows)
    out = {"packed_ids": np.zeros((b, length), np.int64), "targets": np.full((b, length), IGNORE, np.int64),
           "positions": np.zeros((b, length, 3), np.int64), "block_ids": np.zeros((b, length), np.int64),
           "clip_ids": np.zeros((b, length), np.int64)}
    used = 0
    for r, clips in enumerate(rows):
        at = 0
        for c, clip in enumerate(clips):
            tables = clip_tables(layout, clip)
            n = len(tables["packed_ids"])
            if at + n > length:
                raise ValueError(f"packed row {r} needs more than {length} positions (data.pack_tokens): its clips "
                                 f"have grids {[list(x.grid) for x in clips]}")
            for key, value in tables.items():
                out[key][r, at:at + n] = value
            out["clip_ids"][r, at:at + n] = c
            at += n
        out["clip_ids"][r, at:] = len(clips)  # padding: one more clip, attending only to itself
        used += at
    out["loss_rows"] = np.nonzero(out["targets"].reshape(-1) != IGNORE)[0]
    return {**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}, "clip_positions": used}


def packed_allowed(clip_ids: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Dense [B, S, S] attention rule of packed rows: q sees k iff same clip and block_id(k) <= block_id(q)."""
    same_clip = clip_ids[:, None, :] == clip_ids[:, :, None]
    return same_clip & (block_ids[:, None, :] <= block_ids[:, :, None])
