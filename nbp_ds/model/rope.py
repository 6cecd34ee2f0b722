"""3D rotary position embedding over (t, h, w).

The head dimension is split into three even parts, one per axis; each part rotates by its axis'
coordinate at the usual geometric frequencies. Positions come from the layout (the coordinates of
the token each input position predicts).
"""

from __future__ import annotations

import torch


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Split an even head dimension into three even parts (t gets the remainder)."""
    spatial = (head_dim // 3) // 2 * 2
    return head_dim - 2 * spatial, spatial, spatial


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """positions [S, 3] (t, h, w) -> rotation angles [S, head_dim // 2] (float32)."""
    parts = []
    for axis, dim in enumerate(axis_dims(head_dim)):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
        parts.append(positions[:, axis, None].double() * freqs[None, :])
    return torch.cat(parts, dim=-1).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, S, D] by angles given as cos/sin [S, D/2] (pairs are the two halves of D)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)
