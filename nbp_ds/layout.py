"""The sequence layout: how a (T, H, W) grid of video tokens becomes a model input.

Blocks of shape (bt, bh, bw) tile the grid; blocks are ordered t, then h, then w, and tokens inside a
block in raster order. The input is

    [condition] [BOV block] [video block 0] ... [video block n-2]

and every token of input block i predicts the token at the same place in block i+1 (the BOV block
predicts video block 0). Each input position carries a block id (condition = 0, BOV = 1, ...) and
**query q may see key k iff block_id(k) <= block_id(q)**.

Hybrid layout (the paper's UCF-101 models): the first video block is predicted token by token. The
BOV block shrinks to one token, tokens x0..x(L-2) of block 0 become one-token blocks, and the last
token of block 0 plus L-1 placeholders form the block that predicts video block 1.

Frame prediction (``condition: frames``): the given context frames are ordinary video blocks at the
start of the sequence, fed in the first generation step and excluded from the loss unless
``loss_on_context``. This keeps ``logits`` defined for every video token and one code path for all
conditions.

Rotary positions: each input position carries the (t, h, w) of the token it *predicts*, so the BOV
block sits where video block 0 sits and relative offsets are the same at every generation step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from nbp_ds.config import LayoutConfig

# input_source codes for positions that do not feed a video token
SOURCE_BOV = -1
SOURCE_PLACEHOLDER = -2
SOURCE_CLASS = -3


@dataclass(frozen=True)
class GenerationStep:
    """One forward pass of block decoding: feed input positions [start, end), sample ``read``."""

    start: int
    end: int
    read: tuple[int, ...]  # input positions whose targets are sampled after this pass


@dataclass(frozen=True)
class Layout:
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    vocab_size: int
    hybrid: bool = False
    condition: str = "none"
    num_classes: int = 0
    context_frames: int = 0
    loss_on_context: bool = False

    @classmethod
    def from_config(cls, layout: LayoutConfig, vocab_size: int) -> Layout:
        return cls(
            grid=tuple(layout.grid), block=tuple(layout.block), vocab_size=vocab_size, hybrid=layout.hybrid,
            condition=layout.condition, num_classes=layout.num_classes,
            context_frames=layout.context_frames if layout.condition == "frames" else 0,
            loss_on_context=layout.loss_on_context,
        )

    # ---- sizes and special tokens -------------------------------------------------------------
    @property
    def num_video_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def block_size(self) -> int:
        bt, bh, bw = self.block
        return bt * bh * bw

    @property
    def num_blocks(self) -> int:
        return self.num_video_tokens // self.block_size

    @property
    def prefix_len(self) -> int:
        """Condition tokens before the BOV block (a class token, or none)."""
        return 1 if self.condition == "class" else 0

    @property
    def seq_len(self) -> int:
        return self.prefix_len + self.num_video_tokens

    @property
    def bov_token(self) -> int:
        return self.vocab_size

    @property
    def placeholder_token(self) -> int:
        return self.vocab_size + 1

    @property
    def null_class(self) -> int:
        """Label index of the unconditional class (classifier-free guidance)."""
        return self.num_classes

    def class_token(self, label: torch.Tensor) -> torch.Tensor:
        return label + self.vocab_size + 2

    @property
    def embedding_size(self) -> int:
        """Rows of the input embedding: video codes, BOV, placeholder, classes + null class."""
        extra = self.num_classes + 1 if self.condition == "class" else 0
        return self.vocab_size + 2 + extra

    # ---- static index tables ------------------------------------------------------------------
    @cached_property
    def block_order(self) -> np.ndarray:
        """block_order[i] = raster index (t, h, w order) of the i-th token in block order."""
        t, h, w = self.grid
        bt, bh, bw = self.block
        raster = np.arange(t * h * w).reshape(t // bt, bt, h // bh, bh, w // bw, bw)
        return raster.transpose(0, 2, 4, 1, 3, 5).reshape(-1).copy()

    @cached_property
    def _tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_source, target, block_id) for every input position."""
        order, n, size = self.block_order, self.num_blocks, self.block_size
        source: list[int] = [SOURCE_CLASS] * self.prefix_len
        target: list[int] = [-1] * self.prefix_len
        block_id: list[int] = [0] * self.prefix_len
        if self.hybrid:
            # BOV token, then tokens x0..x(L-2) of block 0, each its own block: next-token prediction
            source += [SOURCE_BOV] + [int(order[i]) for i in range(size - 1)]
            target += [int(order[i]) for i in range(size)]
            block_id += list(range(1, size + 1))
            # last token of block 0 plus placeholders predicts video block 1
            source += [int(order[size - 1])] + [SOURCE_PLACEHOLDER] * (size - 1)
            target += [int(x) for x in order[size:2 * size]]
            block_id += [size + 1] * size
            first_plain, next_id = 1, size + 2
        else:
            source += [SOURCE_BOV] * size
            target += [int(x) for x in order[:size]]
            block_id += [1] * size
            first_plain, next_id = 0, 2
        for b in range(first_plain, n - 1):
            source += [int(x) for x in order[b * size:(b + 1) * size]]
            target += [int(x) for x in order[(b + 1) * size:(b + 2) * size]]
            block_id += [next_id + b - first_plain] * size
        return np.array(source), np.array(target), np.array(block_id)

    @property
    def input_source(self) -> np.ndarray:
        """Raster index of the video token fed at each input position, or a SOURCE_* code."""
        return self._tables[0]

    @property
    def target_index(self) -> np.ndarray:
        """Raster index of the video token each input position predicts, -1 for none."""
        return self._tables[1]

    @property
    def block_ids(self) -> np.ndarray:
        return self._tables[2]

    @cached_property
    def positions(self) -> np.ndarray:
        """(t, h, w) per input position: that of its target; the class token sits at (-1, 0, 0)."""
        t, h, w = self.grid
        tgt = self.target_index
        raster = np.maximum(tgt, 0)
        pos = np.stack([raster // (h * w), (raster // w) % h, raster % w], axis=1)
        pos[tgt < 0] = (-1, 0, 0)
        return pos

    @cached_property
    def context_mask(self) -> np.ndarray:
        """Per raster token: True where the token belongs to a given context frame."""
        t, h, w = self.grid
        frame = np.arange(self.num_video_tokens) // (h * w)
        return frame < self.context_frames

    @cached_property
    def loss_mask(self) -> np.ndarray:
        """Per input position: True where its target counts in the loss."""
        tgt = self.target_index
        mask = tgt >= 0
        if not self.loss_on_context:
            mask &= ~self.context_mask[np.maximum(tgt, 0)]
        return mask

    def allowed(self) -> torch.Tensor:
        """Dense [S, S] boolean attention rule: q sees k iff block_id(k) <= block_id(q)."""
        ids = torch.from_numpy(self.block_ids)
        return ids[None, :] <= ids[:, None]

    # ---- batch conversion ---------------------------------------------------------------------
    def input_ids(self, tokens: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """Video tokens [B, T, H, W] (+ labels [B]) -> model input ids [B, S]."""
        flat = tokens.reshape(tokens.shape[0], -1)
        source = torch.as_tensor(self.input_source, device=flat.device)
        ids = flat[:, source.clamp(min=0)].clone()
        ids[:, source == SOURCE_BOV] = self.bov_token
        ids[:, source == SOURCE_PLACEHOLDER] = self.placeholder_token
        if self.condition == "class":
            if label is None:
                raise ValueError("this layout is class-conditional: the batch needs a 'label' tensor")
            ids[:, source == SOURCE_CLASS] = self.class_token(label.to(flat.device)).unsqueeze(1)
        return ids

    def targets(self, tokens: torch.Tensor) -> torch.Tensor:
        """Video tokens [B, T, H, W] -> target per input position [B, S], -100 where nothing counts."""
        flat = tokens.reshape(tokens.shape[0], -1)
        tgt = torch.as_tensor(self.target_index, device=flat.device)
        out = flat[:, tgt.clamp(min=0)].clone()
        out[:, ~torch.as_tensor(self.loss_mask, device=flat.device)] = -100
        return out

    def to_raster(self, per_position: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] values per input position -> [B, N, ...] per predicted raster token."""
        tgt = self.target_index
        rows = np.nonzero(tgt >= 0)[0]
        inverse = np.empty(self.num_video_tokens, dtype=np.int64)
        inverse[tgt[rows]] = rows
        return per_position[:, torch.as_tensor(inverse, device=per_position.device)]

    # ---- generation -----------------------------------------------------------------------------
    @cached_property
    def generation_steps(self) -> tuple[GenerationStep, ...]:
        """Forward passes of KV-cache decoding, each feeding whole blocks.

        A pass runs up to and including the next block that has targets still to be sampled (for
        frame prediction the first pass also feeds every context block); NBP gives one pass per
        block, NTP one per token, hybrid L + n - 1.
        """
        ids, tgt = self.block_ids, self.target_index
        known = self.context_mask
        steps, start = [], 0
        boundaries = np.nonzero(np.diff(ids))[0] + 1
        for lo, hi in zip(np.r_[0, boundaries], np.r_[boundaries, len(ids)], strict=True):
            read = tuple(int(p) for p in range(lo, hi) if tgt[p] >= 0 and not known[tgt[p]])
            if read:
                steps.append(GenerationStep(start, int(hi), read))
                start = int(hi)
        return tuple(steps)
