"""The packing loader (nbp_ds.data.packer): clips of several grids in rows of data.pack_tokens positions, every
sample once across ranks and workers, an exact mid-epoch resume, and what could not be packed counted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_resume import saved, take

from nbp_ds.cli import inspect_shards
from nbp_ds.data import TokenShardWriter, build_loader
from nbp_ds.data.packer import PackSpec, padding_fraction
from nbp_ds.layout import Layout

# block (1,1,4), no condition: a clip of grid (T,H,W) takes T*H*W positions (BOV block + all blocks but the last)
LAYOUT = Layout(grid=(3, 4, 4), block=(1, 1, 4), vocab_size=1000)
GRIDS = [(1, 4, 4), (2, 4, 4), (3, 4, 8), (2, 4, 8), (1, 8, 8)]  # 16, 32, 96, 64, 64 positions
TOO_LONG = (4, 8, 8)  # 256 positions: more than a row
PACK = PackSpec(LAYOUT, 128)


def write_mixed(folder: Path, n: int, per_shard: int, too_long_every: int = 0) -> dict[int, tuple]:
    """n clips of the GRIDS in turn (every ``too_long_every``-th of TOO_LONG), first token = clip id; -> id: grid."""
    rng = np.random.default_rng(0)
    grids = {}
    with TokenShardWriter(folder, maxcount=per_shard) as writer:
        for i in range(n):
            grid = TOO_LONG if too_long_every and i % too_long_every == too_long_every - 1 else GRIDS[i % len(GRIDS)]
            tokens = rng.integers(0, 1000, grid)
            tokens.flat[0] = i
            writer.write(f"clip{i:05d}", tokens, label=None, meta={"source": f"v{i}.mp4"})
            grids[i] = grid
    return grids


def ids(batch) -> list[int]:
    return [int(k.removeprefix("clip")) for k in batch["key"]]


def padding_of(batch, grids) -> int:
    """Padding positions of a packed batch, from the clips' grids (not from the batch's own tables)."""
    used = sum(int(np.prod(grids[i])) for i in ids(batch))
    return batch["packed_ids"].numel() - used


def test_train_every_sample_once_across_2_ranks_x_2_workers(tmp_path):
    """Each of the 4 slots' first epoch (a shuffle buffer of one yields its shards' samples in plan order) is made
    of packed batches only; together they hold every sample once, and the padding counted is the padding there."""
    grids = write_mixed(tmp_path, 48, per_shard=6)  # 8 shards: 2 per slot, 12 samples each
    seen, slots = [], {}
    for rank in range(2):
        loader = build_loader(tmp_path, grid=None, batch_size=2, mode="train", rank=rank, world_size=2,
                              num_workers=2, seed=5, shuffle_buffer=1, with_keys=True, pack=PACK)
        batches = take(loader, 12)
        for i, batch in enumerate(batches):  # worker role i % 2 made batch i
            slots.setdefault((rank, i % 2), []).extend(ids(batch))
        stats = loader.stats()
        assert stats["samples"] == sum(len(b["key"]) for b in batches)
        assert stats["pack_positions"] == 12 * 2 * 128
        assert stats["pack_padding"] == sum(padding_of(b, grids) for b in batches)
        assert all(b["packed_ids"].shape == (2, 128) for b in batches)
    for keys in slots.values():
        assert len(keys) >= 12
        seen += keys[:12]
    assert sorted(seen) == list(range(48))


@pytest.mark.parametrize("workers", [0, 2])
def test_packed_train_resumes_exactly_mid_epoch(tmp_path, workers):
    write_mixed(tmp_path, 60, per_shard=5)
    kwargs = dict(grid=None, batch_size=2, mode="train", rank=1, world_size=2, num_workers=workers, seed=3,
                  shuffle_buffer=6, with_keys=True, pack=PACK)
    straight = take(build_loader(tmp_path, **kwargs), 24)  # rank 1 holds 30 samples: several epochs
    for k in (3, 11):
        first = build_loader(tmp_path, **kwargs)
        take(first, k)
        resumed = build_loader(tmp_path, **kwargs)
        assert resumed.load_state_dict(json.loads(json.dumps(saved(first))))
        rest = take(resumed, 24 - k)
        for a, b in zip(straight[k:], rest, strict=True):
            assert a["key"] == b["key"]
            for name in ("packed_ids", "targets", "positions", "block_ids", "clip_ids", "loss_rows"):
                assert torch.equal(a[name], b[name]), name
        assert resumed.stats()["samples"] == sum(len(b["key"]) for b in straight)


def test_val_packs_every_sample_once_and_counts_what_could_not_be_packed(tmp_path):
    grids = write_mixed(tmp_path, 47, per_shard=6, too_long_every=7)  # clips 6, 13, ..., 41: too long
    too_long = [i for i, g in grids.items() if g == TOO_LONG]
    seen, unpackable, positions, padding = [], 0, 0, 0
    for rank in range(2):
        loader = build_loader(tmp_path, grid=None, batch_size=2, mode="val", rank=rank, world_size=2, num_workers=2,
                              with_keys=True, pack=PACK)
        batches = list(loader)
        seen += [i for b in batches for i in ids(b)]
        stats = loader.stats()
        unpackable += stats["unpackable"]
        positions += stats["pack_positions"]
        padding += sum(padding_of(b, grids) for b in batches)
        assert stats["pack_padding"] == sum(padding_of(b, grids) for b in batches)
    assert sorted(seen) == sorted(set(range(47)) - set(too_long))
    assert unpackable == len(too_long) == 6
    fraction = padding_fraction({"pack_positions": positions, "pack_padding": padding})
    assert 0 < fraction < 0.5 and fraction == pytest.approx(padding / positions)


def test_inspect_shards_reports_every_shape_with_its_tokens(tmp_path, capsys):
    """Shards of several shapes: each shape with its sample count and tokens; an error unless --mixed says so."""
    grids = write_mixed(tmp_path, 20, per_shard=6)  # the five GRIDS, four clips each
    report = inspect_shards.inspect(str(tmp_path))
    want = {"x".join(map(str, g)): 4 for g in GRIDS}
    assert report["shapes"] == want
    for grid in GRIDS:
        size = int(np.prod(grid))
        assert report["shape_tokens"]["x".join(map(str, grid))] == {"per_sample": size, "total": 4 * size}
    assert sum(v["total"] for v in report["shape_tokens"].values()) == sum(int(np.prod(g)) for g in grids.values())
    assert inspect_shards.main([str(tmp_path)]) == 1
    assert "5 shapes" in capsys.readouterr().err
    assert inspect_shards.main([str(tmp_path), "--mixed"]) == 0
    assert "3x4x8       4 samples x 96 tokens = 384 tokens" in capsys.readouterr().out
