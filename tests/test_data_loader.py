"""Token shards: schema, writer, and the loader's train / val semantics on real tar files."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from nbp_ds.data import (
    SampleError,
    TokenShardWriter,
    build_loader,
    decode_sample,
    encode_sample,
    expand_shards,
)

GRID = (2, 3, 4)


def write_shards(folder: Path, n: int, per_shard: int, vocab: int = 1000, prefix: str = "shard",
                 offset: int = 0) -> list[str]:
    """n clips whose first token encodes the clip id, offset + i (so tests can identify them)."""
    rng = np.random.default_rng(0)
    with TokenShardWriter(folder, prefix=prefix, maxcount=per_shard) as writer:
        for i in range(offset, offset + n):
            tokens = rng.integers(0, vocab, GRID)
            tokens.flat[0] = i
            writer.write(f"clip{i:05d}", tokens, label=i % 5, meta={"source": f"v{i}.mp4"})
    return [str(p) for p in writer.written]


def ids_of(batches) -> list[int]:
    return [int(t.flatten()[0]) for b in batches for t in b["tokens"]]


def test_schema_round_trip_and_dtypes():
    small = encode_sample("a", np.arange(24).reshape(GRID), 3, {"fps": 8})
    big = encode_sample("b", np.full(GRID, 70000), None, {})
    assert np.load(io.BytesIO(small["tokens.npy"])).dtype == np.uint16
    assert np.load(io.BytesIO(big["tokens.npy"])).dtype == np.int32
    tokens, label, meta = decode_sample(small, GRID)
    assert tokens.dtype == np.int64 and tokens.tolist() == np.arange(24).reshape(GRID).tolist()
    assert label == 3 and meta["fps"] == 8 and meta["schema"] == 1
    assert decode_sample(big)[1] == -1


@pytest.mark.parametrize("damage, fragment", [
    (lambda s: s.update({"tokens.npy": b"garbage"}), "not a valid .npy"),
    (lambda s: s.pop("tokens.npy"), "no tokens.npy"),
    (lambda s: s.update({"cls": b"cat"}), "not an integer"),
])
def test_decode_errors_name_the_key(damage, fragment):
    sample = encode_sample("clip7", np.zeros(GRID, dtype=int), 1, {})
    damage(sample)
    with pytest.raises(SampleError, match=f"clip7.*{fragment}"):
        decode_sample(sample, GRID)
    with pytest.raises(SampleError, match="layout.grid"):
        decode_sample(encode_sample("x", np.zeros((1, 3, 4), dtype=int), 1, {}), GRID)


def test_writer_rolls_over_and_renames(tmp_path):
    shards = write_shards(tmp_path, 25, per_shard=10)
    assert [Path(s).name for s in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert not list(tmp_path.glob(".*"))  # no temporary left behind
    with pytest.raises(RuntimeError), TokenShardWriter(tmp_path / "x", maxcount=10) as w:
        w.write("a", np.zeros(GRID, dtype=int), 0, {})
        raise RuntimeError("interrupted")
    assert not list((tmp_path / "x").iterdir())  # no partial shard under any name


def test_expand_shards(tmp_path):
    shards = write_shards(tmp_path, 30, per_shard=10)
    assert expand_shards(str(tmp_path)) == shards
    assert expand_shards(str(tmp_path / "shard-{000000..000002}.tar")) == shards
    assert expand_shards(str(tmp_path / "shard-*.tar")) == shards
    assert expand_shards(shards[:2]) == shards[:2]
    with pytest.raises(FileNotFoundError, match="nope"):
        expand_shards(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="missing"):
        expand_shards(str(tmp_path / "shard-{000000..000005}.tar"))


@pytest.mark.parametrize("n_shards", [8, 3])  # more shards than slots, and fewer
def test_val_every_sample_once_across_ranks_and_workers(tmp_path, n_shards):
    n = 47
    write_shards(tmp_path, n, per_shard=-(-n // n_shards))
    seen = []
    for rank in range(2):
        loader = build_loader(tmp_path, grid=GRID, batch_size=4, mode="val", rank=rank, world_size=2, num_workers=2)
        batches = list(loader)
        seen += ids_of(batches)
        assert loader.stats()["samples"] == len(ids_of(batches))
    assert sorted(seen) == list(range(n))


def test_train_is_deterministic_and_resumes_at_a_batch(tmp_path):
    write_shards(tmp_path, 60, per_shard=6)
    kwargs = dict(grid=GRID, batch_size=4, mode="train", rank=1, world_size=2, num_workers=2, seed=3,
                  shuffle_buffer=8)

    def first(k, start=0):
        out = []
        for batch in build_loader(tmp_path, start_batch=start, **kwargs):
            out.append(batch)
            if len(out) == k:
                return out

    straight = first(12)
    again = first(12)
    resumed = first(7, start=5)
    for a, b in zip(straight, again, strict=True):
        assert torch.equal(a["tokens"], b["tokens"])
    for a, b in zip(straight[5:], resumed, strict=True):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["label"], b["label"])
    # endless: more batches than one pass over this rank's 30 clips
    assert len(ids_of(first(20))) == 80
    other_rank = build_loader(tmp_path, **{**kwargs, "rank": 0})
    ours = set(ids_of(first(7)))
    theirs = set(ids_of([b for b, _ in zip(other_rank, range(7), strict=False)]))
    assert not ours & theirs  # ranks read disjoint shards


def corrupt_shard(path: Path, grid: tuple[int, int, int] = GRID) -> None:
    """A real tar with one member of bad npy bytes, one of the wrong shape, and one good sample (of ``grid``)."""
    good = encode_sample("good", np.ones(grid, dtype=int), 1, {})
    bad_npy = {**encode_sample("badnpy", np.ones(grid, dtype=int), 1, {}), "tokens.npy": b"\x93NUMPY garbage"}
    wrong = encode_sample("wrongshape", np.ones((1, 1, 1), dtype=int), 1, {})
    with tarfile.open(path, "w") as tar:
        for sample in (bad_npy, wrong, good):
            for ext in ("tokens.npy", "cls"):
                data = sample[ext]
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_corrupt_members_and_truncated_tar_are_skipped_and_counted(tmp_path):
    write_shards(tmp_path, 10, per_shard=10)
    corrupt_shard(tmp_path / "shard-000001.tar")
    full = tmp_path / "shard-000000.tar"
    truncated = tmp_path / "shard-000002.tar"
    truncated.write_bytes(full.read_bytes()[: os.path.getsize(full) // 2])
    loader = build_loader(tmp_path, grid=GRID, batch_size=4, mode="val", num_workers=2, retries=1, retry_backoff=0)
    ids = ids_of(list(loader))
    stats = loader.stats()
    # the truncated shard is read again once (data.retries=1), from where it broke, then given up
    assert stats["corrupt"] == 1 and stats["bad_shape"] == 1
    assert stats["failed_shards"] == 1 and stats["shard_retries"] == 1
    # the intact shard whole, the complete members before the truncation (a copy of clips 0..4),
    # and the good member of the corrupt shard (all ones)
    assert sorted(ids) == sorted(list(range(10)) + list(range(5)) + [1])
    assert stats["samples"] == len(ids)


def test_a_bad_member_is_warned_about_once_per_slot_but_counted_every_epoch(tmp_path, caplog):
    """The endless train stream meets the same bad members every epoch: one warning each, every skip counted."""
    corrupt_shard(tmp_path / "only.tar")  # per epoch: badnpy (corrupt), wrongshape (bad shape), good
    # one in-process slot (so the log is captured here); batches of one, a shuffle buffer of one, so that
    # decoding sees the shard's stored order: after the k-th batch, k epochs of both bad members were skipped
    loader = build_loader(tmp_path, grid=GRID, batch_size=1, mode="train", num_workers=0, shuffle_buffer=1)
    with caplog.at_level(logging.WARNING, logger="nbp_ds.data.loader"):
        batches = [b for _, b in zip(range(5), loader, strict=False)]  # range first: no 6th batch is read
    assert len(batches) == 5 and all(int(b["tokens"].min()) == 1 for b in batches)  # the good one, 5 times
    stats = loader.stats()
    assert stats["corrupt"] == 5 and stats["bad_shape"] == 5
    skips = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert sum("badnpy" in m for m in skips) == 1, skips
    assert sum("wrongshape" in m for m in skips) == 1, skips


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_train_stream_with_no_usable_sample_stops_with_an_error_instead_of_hanging(tmp_path, num_workers):
    """Training resamples endlessly: shards of another grid (every member skipped as bad_shape) once made the
    stream read for ever and the run hang without a step. It stops after a few passes over the shards, naming
    a shard and the shapes. Read in a child process, so that a stream that hangs fails this test in 120 s."""
    write_shards(tmp_path, n=12, per_shard=4)  # clips of GRID (2,3,4)
    script = ("import sys\nfrom nbp_ds.data import build_loader\n"
              f"loader = build_loader({str(tmp_path)!r}, grid=(3, 3, 4), batch_size=2, mode='train', "
              f"num_workers={num_workers}, shuffle_buffer=8)\n"
              "next(iter(loader))\n")
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the stream with no usable sample was still reading after 120 s")
    assert done.returncode != 0
    assert re.search(r"no usable sample in \d+ in a row", done.stderr), done.stderr[-2000:]
    assert "shard-0000" in done.stderr and "(2, 3, 4) != layout.grid (3, 3, 4)" in done.stderr


def test_rare_usable_samples_keep_the_stream_going(tmp_path):
    """One usable clip among 24 of another grid, a shuffle buffer larger than the data: no error, every batch
    is that clip."""
    rng = np.random.default_rng(1)
    with TokenShardWriter(tmp_path, prefix="mixed", maxcount=5) as writer:
        for i in range(25):
            grid = GRID if i == 17 else (3, 3, 4)
            writer.write(f"clip{i:05d}", rng.integers(1, 1000, grid), label=0, meta={"source": f"v{i}.mp4"})
    loader = build_loader(tmp_path, grid=GRID, batch_size=1, mode="train", num_workers=0, shuffle_buffer=32)
    batches = [b for _, b in zip(range(6), loader, strict=False)]
    # each epoch reads all 25 once: the 6th good one comes at read 5 * 25 + 18 or later, at most 32 of those
    # reads are still in the buffer, so at least 143 - 32 - 6 of the emitted ones were skipped
    assert len(batches) == 6 and all(tuple(b["tokens"].shape[1:]) == GRID for b in batches)
    assert loader.stats()["bad_shape"] >= 5 * 25 + 18 - 32 - 6
