"""Shards from anywhere WebDataset reads (real HTTP on the loopback address, pipe:cat), retries of broken
shards, seeking inside a shard, and weighted mixtures of sources."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from shard_server import ShardServer
from test_data_loader import GRID, ids_of, write_shards
from train_helpers import ROOT
from webdataset.gopen import gopen

from nbp_ds.config import load_config
from nbp_ds.data import DataReport, RetryPolicy, build_loader, expand_shards, read_shard
from nbp_ds.data.shards import PipeReader, sample_offsets
from nbp_ds.errors import ConfigError

NO_WAIT = {"retries": 2, "retry_backoff": 0.0}


def first_batches(loader, k: int) -> list[dict]:
    return [b for _, b in zip(range(k), loader, strict=False)]  # range first: no extra batch is read


def test_expand_shards_takes_urls_and_pipes_as_given(tmp_path):
    shards = write_shards(tmp_path, 20, per_shard=10)
    assert expand_shards("https://host/train-{000..002}.tar") == [f"https://host/train-{i:03d}.tar" for i in range(3)]
    assert expand_shards("pipe:aws s3 cp s3://b/t-{0..1}.tar -") == ["pipe:aws s3 cp s3://b/t-0.tar -",
                                                                     "pipe:aws s3 cp s3://b/t-1.tar -"]
    assert expand_shards(f"{shards[0]}::http://h/x.tar") == [shards[0], "http://h/x.tar"]
    assert expand_shards(f"file://{shards[1]}") == [shards[1]]
    assert expand_shards(str(tmp_path)) == shards  # a folder still lists its .tar files
    with pytest.raises(FileNotFoundError, match="missing"):  # local brace patterns are still checked
        expand_shards(str(tmp_path / "shard-{000000..000003}.tar"))
    with pytest.raises(FileNotFoundError, match="s3://.*pipe:"):
        expand_shards("s3://bucket/x.tar")


def test_http_and_pipe_shards_read_exactly_like_local_ones(tmp_path):
    shards = write_shards(tmp_path, 46, per_shard=8)
    names = [Path(s).name for s in shards]
    kwargs = dict(grid=GRID, batch_size=4, num_workers=2, seed=5, shuffle_buffer=6)
    with ShardServer(tmp_path) as server:
        specs = {"local": shards, "http": [server.url(n) for n in names], "pipe": [f"pipe:cat {s}" for s in shards]}
        for mode, batches in (("val", None), ("train", 15)):
            read = {}
            for kind, spec in specs.items():
                loader = build_loader(spec, mode=mode, **kwargs)
                got = list(loader) if batches is None else first_batches(loader, batches)
                read[kind] = (ids_of(got), [b["label"].tolist() for b in got])
            assert read["http"] == read["local"] and read["pipe"] == read["local"], mode
            if mode == "val":
                assert sorted(read["local"][0]) == list(range(46))
        assert all(server.requests[n] >= 1 for n in names)


def test_a_404_and_a_cut_stream_are_retried_then_skipped_and_counted(tmp_path):
    shards = write_shards(tmp_path, 24, per_shard=8)
    names = [Path(s).name for s in shards]
    with ShardServer(tmp_path) as server:
        cut_at = Path(shards[1]).stat().st_size // 2
        spec = [server.url(names[0]), server.url(names[1], cut=cut_at), server.url("missing.tar"),
                server.url(names[2], cut=cut_at, times=1)]  # the last breaks once: its retry completes it
        loader = build_loader(spec, grid=GRID, batch_size=4, mode="val", num_workers=0, **NO_WAIT)
        ids = sorted(ids_of(list(loader)))
        stats = loader.stats()
        # shard 0 whole, shard 2 whole and once (its retry skipped what the broken attempt had yielded), and of
        # shard 1 a first part, each sample once: how far an attempt gets before the cut is timing (webdataset's
        # pipe raises as soon as curl has exited with an error, data still unread), at most what the cut holds
        from_cut = [i for i in ids if 8 <= i < 16]
        assert [i for i in ids if not 8 <= i < 16] == list(range(8)) + list(range(16, 24)), ids
        assert from_cut == list(range(8, 8 + len(from_cut))) and len(from_cut) <= samples_before(shards[1], cut_at)
        assert stats["failed_shards"] == 2
        assert stats["shard_retries"] >= 2 + 2 + 1  # two for each given-up shard (more when one progressed), one
        assert server.requests["missing.tar"] == 3 and server.requests[names[2]] == 2
        problems = "\n".join(loader.problems)
        assert "missing.tar" in problems and names[1] in problems and names[2] not in problems


def samples_before(shard: str, cut: int) -> int:
    """Samples a reader gets whole from the first ``cut`` bytes of a tar: it knows a sample is complete once
    the next sample's first member has been read (header and data), computed here from the member table."""
    members = tarfile.open(shard).getmembers()
    keys = [m.name.split(".")[0] for m in members]
    firsts = [m for i, m in enumerate(members) if i == 0 or keys[i] != keys[i - 1]]
    return sum(m.offset_data + m.size <= cut for m in firsts[1:])


def test_a_truncated_shard_keeps_what_it_holds_and_training_goes_on(tmp_path):
    shards = write_shards(tmp_path, 16, per_shard=8)
    size = Path(shards[1]).stat().st_size
    Path(shards[1]).write_bytes(Path(shards[1]).read_bytes()[: size // 2])
    kept = samples_before(str(tmp_path / "shard-000000.tar"), size // 2)  # the same layout as the damaged one
    loader = build_loader(tmp_path, grid=GRID, batch_size=4, mode="train", num_workers=0, shuffle_buffer=1,
                          **NO_WAIT)
    got = ids_of(first_batches(loader, 8 + kept))  # four epochs of what remains (batches of 4)
    assert len(got) == 4 * (8 + kept) and Counter(got) == {i: 4 for i in [*range(8), *range(8, 8 + kept)]}
    assert loader.stats()["failed_shards"] == 4  # once per epoch, every one counted


def test_a_command_that_fails_after_part_of_a_shard_yields_what_it_wrote(tmp_path):
    """A download cut midway (curl exits non-zero) on a fast network or a small shard: the command has ended
    before the reader's first read. Every sample it wrote is still read, then its failure is counted."""
    shard = write_shards(tmp_path, 12, per_shard=12)[0]
    cut = Path(shard).stat().st_size // 2  # well under a pipe's buffer: the command can end unread
    command = f"pipe:head -c {cut} {shard}; exit 3"
    pipe = gopen(command, "rb")
    pipe.proc.wait()  # ended before the first read
    reader, data = PipeReader(pipe), b""
    with pytest.raises(OSError, match="exit 3"):
        while chunk := reader.read(1000):
            data += chunk
    assert data == Path(shard).read_bytes()[:cut]
    report = DataReport()
    got = [o for o, _ in read_shard(command, policy=RetryPolicy(retries=0), report=report)]
    assert got == list(range(samples_before(shard, cut))) and len(got) >= 3
    assert report.counts["failed_shards"] == 1


@pytest.mark.parametrize("kind", ["local", "pipe"])
def test_reading_from_an_ordinal_equals_reading_from_the_start(tmp_path, kind):
    shards = write_shards(tmp_path, 12, per_shard=12)
    url = shards[0] if kind == "local" else f"pipe:cat {shards[0]}"
    report, policy = DataReport(), RetryPolicy(retries=0)
    whole = list(read_shard(url, policy=policy, report=report))
    assert [o for o, _ in whole] == list(range(12))
    for start in (1, 7, 11, 12):
        assert list(read_shard(url, start, policy=policy, report=report)) == whole[start:]
    offsets = sample_offsets(shards[0])
    assert len(offsets) == 12 and offsets[0] == 0 and offsets == sorted(offsets)
    assert not report.counts


def test_a_mixture_yields_its_weights_and_counts_per_source(tmp_path):
    a = write_shards(tmp_path / "a", 200, per_shard=20)  # ids 0..199
    b = write_shards(tmp_path / "b", 200, per_shard=20, prefix="b", offset=1000)  # ids 1000..1199
    spec = [{"shards": str(tmp_path / "a"), "weight": 0.7, "name": "big"}, {"shards": b, "weight": 0.3}]
    kwargs = dict(grid=GRID, batch_size=8, mode="train", world_size=1, num_workers=2, seed=1, shuffle_buffer=16)
    loader = build_loader(spec, **kwargs)
    ids = ids_of(first_batches(loader, 250))
    share = sum(i < 1000 for i in ids) / len(ids)
    assert len(ids) == 2000 and abs(share - 0.7) <= 0.03, share
    stats = loader.stats()
    assert stats["source/big"] == sum(i < 1000 for i in ids) and stats["source/source1"] == sum(i >= 1000 for i in ids)
    assert ids_of(first_batches(build_loader(spec, **kwargs), 250)) == ids  # deterministic
    # a plain list of paths is one source, as before
    plain = build_loader(a + b, **kwargs)
    assert set(plain.stats()) >= {"source/train"}


def test_a_malformed_mixture_is_refused_naming_the_key(tmp_path):
    write_shards(tmp_path, 4, per_shard=4)
    for spec, key in (([{"shards": str(tmp_path), "weight": -1}], r"data.train\[0\].weight"),
                      ([{"shards": str(tmp_path)}, {"weight": 1}], r"data.train\[1\].shards"),
                      ([{"shards": str(tmp_path), "wieght": 1}], r"data.train\[0\].wieght"),
                      ([{"shards": str(tmp_path), "name": "a b"}], r"data.train\[0\].name"),
                      ([str(tmp_path), {"shards": str(tmp_path)}], r"data.train\[0\]: a mixture")):
        with pytest.raises(ConfigError, match=key):
            build_loader(spec, grid=GRID, batch_size=2, mode="train")
    with pytest.raises(FileNotFoundError, match=r"data.train\[1\].shards"):
        build_loader([{"shards": str(tmp_path)}, {"shards": str(tmp_path / "nope")}], grid=GRID, batch_size=2,
                     mode="train")


def test_inspect_shards_reads_remote_specs(tmp_path):
    shards = write_shards(tmp_path / "s", 16, per_shard=8)
    with ShardServer(tmp_path / "s") as server:
        specs = [server.url("shard-{000000..000001}.tar"), f"pipe:cat {shards[0]}", server.url("missing.tar")]
        result = subprocess.run([sys.executable, "-m", "nbp_ds.cli.inspect_shards", *specs, "--retries", "0",
                                 "--json", str(tmp_path / "r.json")], cwd=ROOT, capture_output=True, text=True,
                                timeout=120)
    report = json.loads((tmp_path / "r.json").read_text())
    assert result.returncode == 1, result.stdout + result.stderr
    assert report["shards"] == 4 and report["samples"] == 24 and report["failed_shards"] == 1
    assert report["duplicate_keys"] == 8 and "missing.tar" in result.stdout


def test_a_failing_shard_is_retried_after_pauses_that_double(tmp_path, monkeypatch):
    """data.retries (3 unless set) more attempts, the first after data.retry_backoff seconds, then twice the
    previous pause each time; then the shard is skipped and counted. The pauses are recorded, not waited."""
    import nbp_ds.data.shards as shards

    pauses = []
    monkeypatch.setattr(shards.time, "sleep", pauses.append)
    report = DataReport()
    missing = str(tmp_path / "gone.tar")
    defaults = load_config("tiny")
    assert (defaults.data.retries, defaults.data.retry_backoff) == (3, 1.0)
    policy = RetryPolicy(defaults.data.retries, 0.25)
    assert list(read_shard(missing, policy=policy, report=report)) == []
    assert pauses == [0.25, 0.5, 1.0]
    assert (report.counts["shard_retries"], report.counts["failed_shards"]) == (3, 1)
