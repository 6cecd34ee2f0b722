"""The sequence layout: how a (T, H, W) grid of video tokens becomes a model input.

Blocks of shape (bt, bh, bw) tile the grid; blocks are ordered t, then h, then w, and tokens inside a
block in raster order. The input is

    [condition] [BOV block] [video block 0] ... [video block n-2]

and every token of input block i predicts the token at the same place in block i+1 (the BOV block
predicts video block 0). Each input position carries a block id (condition = 0, BOV = 1, ...) and
**query q may see key k iff block_id(k) <= block_id(q)**.

Hybrid layout (the paper's UCF-101 models): the first video block is predicted token by token. The
BOV block shrinks to one token, tokens x0..x(L-2) of block 0 become one-token blocks, and the last
token of block 0 plus L-1 placeholders form the block that predicts video block 1. ``hybrid_blocks=k``
extends the token-by-token start over the first k video blocks (k = the blocks of a latent frame: the
first frame token by token): tokens x0..x(kL-2) are one-token blocks, and the last of them plus the L-1
placeholders predict video block k. The sequence keeps its length; generation takes kL + n - k passes.

Frame prediction (``condition: frames``): the given context frames are ordinary video blocks at the
start of the sequence, fed in the first generation step and excluded from the loss unless
``loss_on_context``. This keeps ``logits`` defined for every video token and one code path for all
conditions.

Rotary positions: each input position carries the (t, h, w) of the token it *predicts*, so the BOV
block sits where video block 0 sits and relative offsets are the same at every generation step.

The NBP authors' released sequences (nbp-convert-official) need three more options:

* ``bov=False`` (frame prediction, their Kinetics-600 models): no BOV block; the input is video blocks
  0..n-2 and block 0 has no predicting position (``to_raster`` fills it with NaN).
* ``class_prefixes``: the condition of class c is a fixed list of text token ids (their UCF-101 models:
  the class name through the Llama-2 tokenizer, 8 tokens), one prefix block seen by every position.
* ``token_ids``: how tokens map to embedding rows. ``nbp_ds``: video codes 0..V-1, BOV V, placeholder
  V+1, then class tokens (or text ids). ``official`` (the authors' order): BOV 0, the L-1 placeholders
  1..L-1 (each its own id, hybrid only), text ids + L, video codes after the text vocabulary; without a
  BOV (Kinetics-600) video codes are the ids themselves.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from nbp_ds.errors import ConfigError

CONDITIONS = ("none", "class", "frames")
TOKEN_ID_SCHEMES = ("nbp_ds", "official")  # how tokens map to embedding rows (see token_ids above)

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
    hybrid_blocks: int = 1
    condition: str = "none"
    num_classes: int = 0
    context_frames: int = 0
    loss_on_context: bool = False
    bov: bool = True
    class_prefixes: tuple[tuple[int, ...], ...] = ()
    text_vocab_size: int = 0
    token_ids: str = "nbp_ds"

    @classmethod
    def from_config(cls, layout: Any, vocab_size: int) -> Layout:
        """The layout a run config's ``layout`` section describes (nbp_ds.config.LayoutConfig, or anything with
        the same fields), checked. Its lists become tuples: a Layout is immutable and hashable."""
        values = {f.name: _frozen(getattr(layout, f.name)) for f in dataclasses.fields(cls) if f.name != "vocab_size"}
        return cls(vocab_size=vocab_size, **values)

    def __post_init__(self) -> None:
        self._check_grid()
        self._check_condition()
        self._check_token_layout()

    # ---- the rules a layout keeps (errors name the run config's layout.* keys) -----------------------
    def _check_grid(self) -> None:
        _require(len(self.grid) == 3 and all(g > 0 for g in self.grid),
                 f"layout.grid must be three positive integers [T,H,W], got {list(self.grid)}")
        _require(len(self.block) == 3 and all(b > 0 for b in self.block),
                 f"layout.block must be three positive integers [bt,bh,bw], got {list(self.block)}")
        for axis, g, b in zip("THW", self.grid, self.block, strict=True):
            _require(g % b == 0, f"layout.block={list(self.block)} does not divide layout.grid={list(self.grid)} "
                                 f"(axis {axis}: {g} is not a multiple of {b})")

    def _check_condition(self) -> None:
        _require(self.condition in CONDITIONS,
                 f"layout.condition must be one of {', '.join(CONDITIONS)}, got {self.condition!r}")
        if self.condition == "class":
            _require(self.num_classes > 0,
                     f"layout.condition=class needs layout.num_classes > 0, got {self.num_classes}")
        if self.condition == "frames":
            _require(0 < self.context_frames < self.grid[0],
                     f"layout.context_frames must be in 1..{self.grid[0] - 1} for condition=frames, "
                     f"got {self.context_frames}")
            _require(self.context_frames % self.block[0] == 0,
                     f"layout.context_frames={self.context_frames} must be a multiple of the block's time "
                     f"extent layout.block[0]={self.block[0]}")
            _require(not self.hybrid, "layout.hybrid=true is for condition none or class: with condition=frames "
                                      "the first blocks are given, so there is no first block to predict token by "
                                      "token")
        elif self.context_frames:
            _require(False, f"layout.context_frames={self.context_frames} is only used with layout.condition=frames")
        _require(isinstance(self.hybrid_blocks, int) and self.hybrid_blocks >= 1,
                 f"layout.hybrid_blocks must be a positive integer, got {self.hybrid_blocks!r}")
        _require(self.hybrid or self.hybrid_blocks == 1,
                 f"layout.hybrid_blocks={self.hybrid_blocks} is only used with layout.hybrid=true")
        if self.hybrid:
            _require(self.num_blocks > self.hybrid_blocks,
                     f"layout.hybrid=true needs at least {self.hybrid_blocks + 1} blocks, got {self.num_blocks} "
                     f"(grid {list(self.grid)}, block {list(self.block)}, layout.hybrid_blocks={self.hybrid_blocks} "
                     f"token by token and one block after them)")

    def _check_token_layout(self) -> None:
        """The options that describe the NBP authors' released sequences: no BOV, text prefixes, their token ids."""
        if not self.bov:
            _require(self.condition == "frames", f"layout.bov=false needs layout.condition=frames (the given "
                                                 f"context frames start the sequence), got {self.condition!r}")
        if self.class_prefixes:
            _require(self.condition == "class",
                     f"layout.class_prefixes need layout.condition=class, got {self.condition!r}")
            _require(len(self.class_prefixes) == self.num_classes,
                     f"layout.class_prefixes has {len(self.class_prefixes)} entries for layout.num_classes="
                     f"{self.num_classes}: one prefix per class")
            lengths = sorted({len(p) for p in self.class_prefixes})
            _require(lengths[0] > 0 and len(lengths) == 1,
                     f"layout.class_prefixes must all have the same positive length, got lengths {lengths}")
            _require(self.text_vocab_size > 0, "layout.class_prefixes need layout.text_vocab_size > 0")
            bad = [(i, t) for i, p in enumerate(self.class_prefixes) for t in p if not 0 <= t < self.text_vocab_size]
            if bad:
                raise ConfigError(f"layout.class_prefixes[{bad[0][0]}] holds token id {bad[0][1]}, outside "
                                  f"[0, layout.text_vocab_size={self.text_vocab_size})")
        else:
            _require(self.text_vocab_size == 0,
                     f"layout.text_vocab_size={self.text_vocab_size} is only used with layout.class_prefixes")
        _require(self.token_ids in TOKEN_ID_SCHEMES,
                 f"layout.token_ids must be one of {', '.join(TOKEN_ID_SCHEMES)}, got {self.token_ids!r}")
        if self.token_ids == "official":
            ucf = (self.condition == "class" and bool(self.class_prefixes) and self.hybrid and self.hybrid_blocks == 1
                   and self.bov)
            k600 = self.condition == "frames" and not self.bov
            _require(ucf or k600, "layout.token_ids=official describes the released sequences only: class prefixes "
                                  "with hybrid=true (UCF-101) or condition=frames with bov=false (Kinetics-600)")

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
        """Condition tokens before the BOV block (a class token, a class's text prefix, or none)."""
        if self.class_prefixes:
            return len(self.class_prefixes[0])
        return 1 if self.condition == "class" else 0

    @property
    def seq_len(self) -> int:
        return len(self.block_ids)

    @property
    def official_ids(self) -> bool:
        return self.token_ids == "official"

    @property
    def num_special_tokens(self) -> int:
        """Ids before text and video in the authors' order: BOV, and the L-1 placeholders of a hybrid layout."""
        if not self.bov:
            return 0
        return self.block_size if self.hybrid else 1

    @property
    def bov_token(self) -> int:
        return 0 if self.official_ids else self.vocab_size

    @property
    def placeholder_token(self) -> int:
        """Id of the (first) placeholder; with official ids the i-th placeholder is placeholder_token + i."""
        return 1 if self.official_ids else self.vocab_size + 1

    @property
    def text_token_offset(self) -> int:
        """Embedding row of text id 0 (class_prefixes)."""
        return self.num_special_tokens if self.official_ids else self.vocab_size + 2

    @property
    def video_token_offset(self) -> int:
        """Embedding row of video code 0."""
        return self.num_special_tokens + self.text_vocab_size if self.official_ids else 0

    @property
    def has_null_class(self) -> bool:
        """Whether label num_classes (unconditional, for classifier-free guidance) exists: not with text prefixes."""
        return self.condition == "class" and not self.class_prefixes

    @property
    def null_class(self) -> int:
        """Label index of the unconditional class (classifier-free guidance)."""
        return self.num_classes

    def class_token(self, label: torch.Tensor) -> torch.Tensor:
        return label + self.vocab_size + 2

    @property
    def embedding_size(self) -> int:
        """Rows of the input embedding: video codes, BOV, placeholder(s), classes + null class or text ids."""
        if self.official_ids:
            return self.video_token_offset + self.vocab_size
        if self.class_prefixes:
            return self.vocab_size + 2 + self.text_vocab_size
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
        if not self.bov:
            # the given context starts the sequence: video block 0 is an input only, nothing predicts it
            first_plain, next_id = 0, 1
        elif self.hybrid:
            # BOV token, then tokens x0..x(kL-2) of the first k blocks, each its own block: next-token prediction
            k = self.hybrid_blocks
            one_by_one = k * size
            source += [SOURCE_BOV] + [int(order[i]) for i in range(one_by_one - 1)]
            target += [int(order[i]) for i in range(one_by_one)]
            block_id += list(range(1, one_by_one + 1))
            # the last of them plus L-1 placeholders predicts video block k
            source += [int(order[one_by_one - 1])] + [SOURCE_PLACEHOLDER] * (size - 1)
            target += [int(x) for x in order[one_by_one:one_by_one + size]]
            block_id += [one_by_one + 1] * size
            first_plain, next_id = k, one_by_one + 2
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

    @cached_property
    def special_ids(self) -> np.ndarray:
        """Per input position: the token id of a BOV or placeholder position, -1 elsewhere."""
        source = self.input_source
        ids = np.full(len(source), -1, dtype=np.int64)
        ids[source == SOURCE_BOV] = self.bov_token
        placeholders = np.nonzero(source == SOURCE_PLACEHOLDER)[0]
        ordinal = np.arange(len(placeholders)) if self.official_ids else 0  # the authors number them 1..L-1
        ids[placeholders] = self.placeholder_token + ordinal
        return ids

    def allowed(self) -> torch.Tensor:
        """Dense [S, S] boolean attention rule: q sees k iff block_id(k) <= block_id(q)."""
        ids = torch.from_numpy(self.block_ids)
        return ids[None, :] <= ids[:, None]

    @cached_property
    def is_causal(self) -> bool:
        """True when every position is a block of its own: the rule is then plain causal attention, which
        the fastest kernels (cuDNN / FlashAttention ``is_causal``) run without a mask."""
        return bool(np.all(np.diff(self.block_ids) > 0))

    def is_one_block(self, start: int, end: int) -> bool:
        """Do positions [start, end) form one block? Then a decoding pass that feeds them attends to the
        whole cache and to itself with no mask."""
        return bool(self.block_ids[start] == self.block_ids[end - 1])

    # ---- batch conversion ---------------------------------------------------------------------
    def check_labels(self, label: torch.Tensor) -> torch.Tensor:
        """Class labels [B] as a LongTensor, refused with the valid range named when one is outside it.

        The range check reads the values, so it runs only on host tensors: labels on a GPU are checked
        where they were made (the trainer checks each batch before moving it; ``generate`` checks its
        ``label`` argument), which keeps a training step free of host synchronisation."""
        label = label.long()
        if label.device.type == "cpu":
            bad = (label < 0) | (label >= self.num_classes)
            if bool(bad.any()):
                raise ValueError(f"labels must be in [0, {self.num_classes}) (layout.num_classes), "
                                 f"got {sorted(set(label[bad].tolist()))}")
        return label

    def input_ids(self, tokens: torch.Tensor, label: torch.Tensor | None = None, start: int = 0,
                  end: int | None = None) -> torch.Tensor:
        """Model input ids [B, end - start] of sequence positions [start, end) (default: the whole sequence).

        ``tokens`` holds the video tokens, [B, T, H, W] or flat [B, T*H*W] in raster order (during
        generation the ones not sampled yet are ignored: position p reads only the token it feeds);
        ``label`` [B] is required for class-conditional layouts. Index tables live on the tokens' device,
        so this does no host synchronisation (training and every decoding step use it)."""
        flat = tokens.reshape(tokens.shape[0], -1)
        table = self._device_tables(flat.device)
        end = self.seq_len if end is None else end
        source, special = table["source"][start:end], table["special"][start:end]
        video = flat.gather(1, source.clamp(min=0).expand(flat.shape[0], -1)) + self.video_token_offset
        ids = torch.where(special >= 0, special, video)
        if start < self.prefix_len:
            if label is None:
                raise ValueError("this layout is class-conditional: the batch needs a 'label' tensor")
            stop = min(end, self.prefix_len)
            ids[:, : stop - start] = self.condition_ids(label.to(flat.device))[:, start:stop]
        return ids

    def input_ids_at(self, tokens: torch.Tensor, positions: torch.Tensor,
                     condition: torch.Tensor | None = None) -> torch.Tensor:
        """Model input ids [B, n] at the sequence positions ``positions`` (LongTensor [n] on the tokens' device).

        ``input_ids`` for positions given as a tensor rather than a range: one decoding pass of a fixed
        shape then serves every generation step of that shape (the static decoder of nbp_ds.generate, which
        CUDA graphs replay). ``condition`` is ``condition_ids(label)`` [B, prefix_len], made once per video
        batch, and is needed when the layout has a condition prefix. No host synchronisation."""
        flat = tokens.reshape(tokens.shape[0], -1)
        table = self._device_tables(flat.device)
        source, special = table["source"][positions], table["special"][positions]
        video = flat.gather(1, source.clamp(min=0).expand(flat.shape[0], -1)) + self.video_token_offset
        ids = torch.where(special >= 0, special, video)
        if self.prefix_len:
            if condition is None:
                raise ValueError("this layout has a condition prefix: pass condition=layout.condition_ids(label)")
            prefix = condition.gather(1, positions.clamp(max=self.prefix_len - 1).expand(flat.shape[0], -1))
            ids = torch.where(positions < self.prefix_len, prefix, ids)
        return ids

    def condition_ids(self, label: torch.Tensor) -> torch.Tensor:
        """Labels [B] -> the ids of the condition prefix [B, prefix_len]: a class token or the class's text."""
        if not self.class_prefixes:
            return self.class_token(label).unsqueeze(1)
        return self._device_tables(label.device)["class_prefixes"][label] + self.text_token_offset

    def targets(self, tokens: torch.Tensor) -> torch.Tensor:
        """Video tokens [B, T, H, W] -> target per input position [B, S], -100 where nothing counts."""
        flat = tokens.reshape(tokens.shape[0], -1)
        table = self._device_tables(flat.device)
        out = flat.gather(1, table["target"].clamp(min=0).expand(flat.shape[0], -1))
        return torch.where(table["loss_mask"], out, torch.full_like(out, -100))

    def loss_rows(self, device: torch.device) -> torch.Tensor:
        """Input positions whose targets count in the loss, as an index tensor on ``device``."""
        return self._device_tables(device)["loss_rows"]

    def to_raster(self, per_position: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] values per input position -> [B, N, ...] per predicted raster token.

        A token no position predicts (video block 0 of a layout without BOV) gets NaN.
        """
        rows = self._device_tables(per_position.device)["to_raster"]
        if self.predicts_every_token:
            return per_position[:, rows]
        out = per_position.new_full((per_position.shape[0], self.num_video_tokens, *per_position.shape[2:]),
                                    float("nan"))
        predicted = rows >= 0
        out[:, predicted] = per_position[:, rows[predicted]]
        return out

    @cached_property
    def predicts_every_token(self) -> bool:
        return bool(np.all(self._raster_rows >= 0))

    def _device_tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The index tables as tensors on ``device``, made once per device."""
        key = str(device)
        if key not in self._table_cache:
            self._table_cache[key] = {
                "source": torch.as_tensor(self.input_source).to(device),
                "special": torch.as_tensor(self.special_ids).to(device),
                "target": torch.as_tensor(self.target_index).to(device),
                "loss_mask": torch.as_tensor(self.loss_mask).to(device),
                "loss_rows": torch.as_tensor(np.nonzero(self.loss_mask)[0]).to(device),
                "to_raster": torch.as_tensor(self._raster_rows).to(device),
                "class_prefixes": torch.as_tensor(self.class_prefixes or [[]], dtype=torch.long).to(device),
            }
        return self._table_cache[key]

    @cached_property
    def _table_cache(self) -> dict[str, dict[str, torch.Tensor]]:
        return {}

    @cached_property
    def _raster_rows(self) -> np.ndarray:
        """For each raster token, the input position that predicts it (-1: none does)."""
        tgt = self.target_index
        rows = np.nonzero(tgt >= 0)[0]
        inverse = np.full(self.num_video_tokens, -1, dtype=np.int64)
        inverse[tgt[rows]] = rows
        return inverse

    # ---- generation -----------------------------------------------------------------------------
    @cached_property
    def generation_steps(self) -> tuple[GenerationStep, ...]:
        """Forward passes of KV-cache decoding, each feeding whole blocks.

        A pass runs up to and including the next block that has targets still to be sampled (for
        frame prediction the first pass also feeds every context block); NBP gives one pass per
        block, NTP one per token, hybrid kL + n - k (k = hybrid_blocks).
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


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _frozen(value: Any) -> Any:
    """Lists (as YAML gives them) as tuples, nested ones too."""
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value
