"""Attention over packed rows (nbp_ds.packing): the block rule inside each clip, nothing across clips.

The mask depends on the batch, so it is built once per batch, on the device, by :meth:`use_rows` (the model's
forward calls it eagerly, before the layers), and every layer's ``full`` reuses it. It stays until the next
batch sets another, so that a layer recomputed in backward (activation checkpointing) sees the same mask.

* ``sdpa``  the dense [B, 1, S, S] boolean rule (:func:`nbp_ds.packing.packed_allowed`); the reference.
* ``flex``  a BlockMask of the same rule (fully masked tiles, e.g. between two clips, are skipped). Only
  ``ROWS_GUARANTEED_SAFE`` of the layout options holds here: a clip's key tiles do not start at zero.
* ``flash`` refused: FlashAttention-2 takes no mask, and the FlashAttention-4 path is not checked on packed rows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from nbp_ds.model.attention import AttentionUnavailable
from nbp_ds.packing import packed_allowed


class PackedSdpa:
    name = "sdpa"

    def __init__(self, device: torch.device):
        self.device = device
        self._mask: torch.Tensor | None = None

    def use_rows(self, clip_ids: torch.Tensor, block_ids: torch.Tensor) -> None:
        self._mask = packed_allowed(clip_ids, block_ids)[:, None]

    def full(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask)


class PackedFlex:
    name = "flex"

    def __init__(self, device: torch.device, kernel_options: dict[str, Any] | None = None):
        from torch.nn.attention import flex_attention as fa  # local: torch's compiler stack, for this backend only

        self.device, self._fa = device, fa
        self.kernel_options = {"ROWS_GUARANTEED_SAFE": True, **(kernel_options or {})}
        self.block_mask = None
        self._compiled = torch.compile(fa.flex_attention, dynamic=False) if device.type == "cuda" else fa.flex_attention

    def use_rows(self, clip_ids: torch.Tensor, block_ids: torch.Tensor) -> None:
        def packed_block_causal(b, h, q_idx, kv_idx):
            same_clip = clip_ids[b, kv_idx] == clip_ids[b, q_idx]
            return same_clip & (block_ids[b, kv_idx] <= block_ids[b, q_idx])

        rows, length = clip_ids.shape
        self.block_mask = self._fa.create_block_mask(packed_block_causal, rows, None, length, length,
                                                     device=self.device)

    def full(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
            raise AttentionUnavailable("model.attention=flex has no backward pass on CPU in PyTorch; train packed "
                                       "rows on CPU with model.attention=sdpa (or auto)")
        kernel = self._fa.flex_attention if torch.compiler.is_compiling() else self._compiled
        return kernel(q, k, v, block_mask=self.block_mask, kernel_options=self.kernel_options)


def make_packed_attention(name: str, device: torch.device, flex_kernel_options: dict[str, Any] | None = None):
    """The backend ``model.attention`` names, for packed rows on ``device`` (auto: flex on a GPU, else sdpa)."""
    if name == "auto":
        name = "flex" if device.type == "cuda" else "sdpa"
    if name == "sdpa":
        return PackedSdpa(device)
    if name == "flex":
        return PackedFlex(device, flex_kernel_options)
    if name == "flash":
        raise AttentionUnavailable(
            "model.attention=flash cannot train packed rows (data.pack_tokens): FlashAttention-2 takes no mask and "
            "the FlashAttention-4 path is not checked against the packed rule; use model.attention=flex (or auto) on "
            "a GPU, sdpa on the CPU")
    raise ValueError(f"model.attention must be auto, sdpa, flex or flash, got {name!r}")
