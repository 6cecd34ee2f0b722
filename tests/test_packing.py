"""Packed rows' tables (nbp_ds.packing), written out by hand for two small clips of different grids."""

from __future__ import annotations

import numpy as np
import torch

from nbp_ds.layout import Layout
from nbp_ds.packing import IGNORE, Clip, clip_length, pack_rows

V = 16  # vocabulary: BOV is id 16, the placeholder 17, class c is 18 + c


def test_two_clips_each_with_its_own_layout():
    """Grid (1,2,4) then grid (2,1,4), block (1,1,4), class-conditional, in one row of 20: each clip has its
    class token, BOV block, block ids from 0 and positions from (0,0,0); 2 padding positions end the row."""
    layout = Layout(grid=(3, 4, 4), block=(1, 1, 4), vocab_size=V, condition="class", num_classes=3)
    a = np.arange(8).reshape(1, 2, 4)  # tokens 0..7
    b = np.arange(8, 16).reshape(2, 1, 4)  # tokens 8..15
    assert clip_length(layout, a.shape) == clip_length(layout, b.shape) == 9
    got = pack_rows(layout, [[Clip(a, label=2), Clip(b, label=0)]], 20)

    bov, cls = [V] * 4, lambda c: [18 + c]
    np.testing.assert_array_equal(got["packed_ids"][0],
                                  cls(2) + bov + [0, 1, 2, 3] + cls(0) + bov + [8, 9, 10, 11] + [0, 0])
    np.testing.assert_array_equal(got["targets"][0], [IGNORE] + list(range(8)) + [IGNORE] + list(range(8, 16))
                                  + [IGNORE] * 2)
    np.testing.assert_array_equal(got["block_ids"][0], [0, 1, 1, 1, 1, 2, 2, 2, 2] * 2 + [0, 0])
    np.testing.assert_array_equal(got["clip_ids"][0], [0] * 9 + [1] * 9 + [2, 2])
    # positions: those of the predicted token, the class token at (-1, 0, 0); clip a is 1x2x4, clip b 2x1x4
    pos_a = [(-1, 0, 0)] + [(0, h, w) for h in range(2) for w in range(4)]
    pos_b = [(-1, 0, 0)] + [(t, 0, w) for t in range(2) for w in range(4)]
    np.testing.assert_array_equal(got["positions"][0], pos_a + pos_b + [(0, 0, 0)] * 2)
    np.testing.assert_array_equal(got["loss_rows"], [*range(1, 9), *range(10, 18)])
    assert got["clip_positions"] == 18
    assert all(v.dtype == torch.long for v in got.values() if isinstance(v, torch.Tensor))


def test_rows_are_flat_indexed_and_padded():
    """Two rows: loss_rows index the flattened [rows * length] positions; an empty row is all padding."""
    layout = Layout(grid=(2, 2, 2), block=(1, 1, 2), vocab_size=V)
    clip = Clip(np.ones((1, 1, 2), np.int64))  # BOV block (2) only: targets 1, 1
    got = pack_rows(layout, [[clip], []], 4)
    np.testing.assert_array_equal(got["loss_rows"], [0, 1])
    np.testing.assert_array_equal(got["clip_ids"], [[0, 0, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(got["targets"][1], [IGNORE] * 4)
