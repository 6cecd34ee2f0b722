"""Finite scalar quantization (Mentzer et al., 2023): each latent channel is bounded and rounded to one of
`levels[i]` values; the code index is the mixed-radix number of the per-channel values. No codebook to
learn, no commitment loss, no dead codes: 64,000 codes for levels [8,8,8,5,5,5]."""

from __future__ import annotations

import math

import torch
from torch import nn


class FSQ(nn.Module):
    def __init__(self, levels: list[int], eps: float = 1e-3):
        super().__init__()
        if not levels or any(lv < 2 for lv in levels):
            raise ValueError(f"FSQ levels must be integers >= 2, got {levels}")
        self.levels = list(levels)
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.float32), persistent=False)
        basis = [math.prod(levels[:i]) for i in range(len(levels))]
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.long), persistent=False)
        self.eps = eps

    @property
    def dim(self) -> int:
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        # tanh squashes into (-half, half); even level counts are shifted by 1/2 so rounding yields exactly
        # `levels` integer values, symmetric for odd counts and offset for even ones
        half_l = (self._levels - 1) * (1 + self.eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [..., dim] -> (quantized values in [-1, 1] with a straight-through gradient, code indices [...])."""
        bounded = self._bound(z.float())
        rounded = bounded + (torch.round(bounded) - bounded).detach()
        half_width = (self._levels // 2)
        return rounded / half_width, self._to_index(torch.round(bounded))

    def _to_index(self, rounded: torch.Tensor) -> torch.Tensor:
        shifted = (rounded + self._levels // 2).long()  # 0 .. levels-1 per channel
        return (shifted * self._basis).sum(-1)

    def indices_to_values(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices [...] -> quantized values [..., dim] in [-1, 1]."""
        if indices.min() < 0 or indices.max() >= self.codebook_size:
            raise ValueError(f"code indices must lie in [0, {self.codebook_size}), got "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        digits = (indices.long().unsqueeze(-1) // self._basis) % self._levels.long()
        return (digits - self._levels.long() // 2).float() / (self._levels // 2)
