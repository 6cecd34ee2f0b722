"""3D rotary embedding: angles for known (t, h, w) positions computed by hand, the rotation of one pair, and the
property attention relies on (a rotated q.k depends on the (t, h, w) offset only, and on each axis' offset)."""

from __future__ import annotations

import math

import pytest
import torch

from nbp_ds.model.rope import apply_rope, rope_angles


def angles(positions: list[list[int]], head_dim: int, theta: float) -> list[list[float]]:
    return rope_angles(torch.tensor(positions), head_dim, theta).tolist()


def test_angles_for_known_positions_head_dim_16():
    # head_dim 16: h and w get the largest even part <= 16 / 3, which is 4 (2 frequencies each); t gets the
    # remaining 8 (4 frequencies). Frequencies theta^(-2i/d) per part, with theta = 10^4:
    #   t (d = 8): 10^(-4 * 0/8), 10^(-4 * 2/8), 10^(-4 * 4/8), 10^(-4 * 6/8) = 1, 0.1, 0.01, 0.001
    #   h, w (d = 4): 10^0, 10^(-4 * 2/4) = 1, 0.01
    got = angles([[1, 2, 3], [4, 0, 7], [-1, 0, 0]], 16, 1e4)
    expected = [
        [1, 0.1, 0.01, 0.001, 2, 0.02, 3, 0.03],
        [4, 0.4, 0.04, 0.004, 0, 0, 7, 0.07],
        [-1, -0.1, -0.01, -0.001, 0, 0, 0, 0],  # the class token sits one frame before the video
    ]
    for row, want in zip(got, expected, strict=True):
        assert row == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_angles_for_known_positions_head_dim_12():
    # head_dim 12 splits evenly, 4 / 4 / 4; with theta = 100 every part has frequencies 1 and 100^(-1/2) = 0.1
    got = angles([[2, 3, 5], [0, 1, 0]], 12, 100.0)
    assert got[0] == pytest.approx([2, 0.2, 3, 0.3, 5, 0.5], rel=1e-6)
    assert got[1] == pytest.approx([0, 0, 1, 0.1, 0, 0], rel=1e-6, abs=1e-9)


def test_apply_rope_rotates_each_half_pair_by_its_angle():
    """Coordinate i and coordinate i + D/2 form the pair that angle i rotates (counter-clockwise)."""
    d = 6
    angle = torch.tensor([[math.pi / 2, math.pi / 3, 0.25]])  # [S = 1, D/2]
    x = torch.eye(d).view(d, 1, 1, d)  # six unit vectors as a batch [B = 6, H = 1, S = 1, D]
    out = apply_rope(x, angle.cos(), angle.sin()).view(d, d)
    for i, a in enumerate(angle[0].tolist()):
        first, second = torch.zeros(d), torch.zeros(d)
        first[i], first[i + d // 2] = math.cos(a), math.sin(a)  # e_i -> cos e_i + sin e_(i+D/2)
        second[i], second[i + d // 2] = -math.sin(a), math.cos(a)  # e_(i+D/2) -> -sin e_i + cos e_(i+D/2)
        torch.testing.assert_close(out[i], first, atol=1e-6, rtol=0)
        torch.testing.assert_close(out[i + d // 2], second, atol=1e-6, rtol=0)


def rotated_scores(q: torch.Tensor, k: torch.Tensor, q_pos: list[int], k_pos: list[int], head_dim: int,
                   theta: float = 1e4) -> torch.Tensor:
    """q [N, D] rotated to q_pos, k [N, D] rotated to k_pos -> the N dot products."""
    ang = rope_angles(torch.tensor([q_pos, k_pos]), head_dim, theta)
    cos, sin = ang.cos(), ang.sin()
    rq = apply_rope(q.view(-1, 1, 1, head_dim), cos[:1], sin[:1])
    rk = apply_rope(k.view(-1, 1, 1, head_dim), cos[1:], sin[1:])
    return (rq * rk).sum(-1).flatten()


@pytest.mark.parametrize("head_dim", [16, 64])
def test_scores_depend_on_the_offset_only(head_dim):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, head_dim, generator=g), torch.randn(8, head_dim, generator=g)
    base = rotated_scores(q, k, [3, 1, 2], [1, 2, 0], head_dim)  # offset (2, -1, 2)
    for shift in ([1, 0, 0], [0, 5, 0], [0, 0, -3], [7, -2, 11], [-4, 9, 1]):
        moved = rotated_scores(q, k, [3 + shift[0], 1 + shift[1], 2 + shift[2]],
                               [1 + shift[0], 2 + shift[1], 0 + shift[2]], head_dim)
        torch.testing.assert_close(moved, base, atol=1e-4, rtol=1e-4, msg=f"shift {shift}")
    # ...and each axis' offset counts: one more step along t, h or w changes every score
    for axis in range(3):
        step = [0, 0, 0]
        step[axis] = 1
        other = rotated_scores(q, k, [3 + step[0], 1 + step[1], 2 + step[2]], [1, 2, 0], head_dim)
        assert bool(((other - base).abs() > 1e-2).all()), f"axis {'thw'[axis]} offset has no effect"
