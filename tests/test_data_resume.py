"""The training loader's saved state: an exact continuation, in constant time, and on another number of
slots (ranks x workers) without repeating or dropping a sample of the interrupted epoch."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from test_data_loader import GRID, ids_of, write_shards

from nbp_ds.data import build_loader
from nbp_ds.data import shards as shards_module
from nbp_ds.data.resume import reshard
from nbp_ds.data.sources import parse_sources


def take(loader, k: int) -> list[dict]:
    return [b for _, b in zip(range(k), loader, strict=False)]  # range first: no extra batch is drawn


def saved(loader) -> dict:
    """The state as a checkpoint keeps it: through JSON."""
    return json.loads(json.dumps(loader.state_dict()))


@pytest.fixture
def two_sources(tmp_path):
    write_shards(tmp_path / "a", 60, per_shard=6)
    write_shards(tmp_path / "b", 24, per_shard=4, offset=500)
    return tmp_path


@pytest.mark.parametrize("workers, mixture", [(0, False), (2, False), (2, True)])
def test_a_saved_state_continues_the_stream_exactly(two_sources, workers, mixture):
    spec = ([{"shards": str(two_sources / "a"), "weight": 2}, {"shards": str(two_sources / "b"), "name": "b"}]
            if mixture else str(two_sources / "a"))
    kwargs = dict(grid=GRID, batch_size=4, mode="train", rank=1, world_size=2, num_workers=workers, seed=3,
                  shuffle_buffer=8)
    straight = take(build_loader(spec, **kwargs), 40)  # rank 1 holds 30 samples of a: several epochs
    for k in (5, 23):
        first = build_loader(spec, **kwargs)
        take(first, k)
        resumed = build_loader(spec, **kwargs)
        assert resumed.load_state_dict(saved(first))
        rest = take(resumed, 40 - k)
        for a, b in zip(straight[k:], rest, strict=True):
            assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["label"], b["label"])
        assert resumed.stats()["samples"] == 160  # the counters continue too
        if mixture:
            assert resumed.stats()["source/b"] == sum(i >= 500 for i in ids_of(straight))
    # a new iteration of the same loader continues after the last batch consumed
    loader = build_loader(spec, **kwargs)
    take(loader, 7)
    assert ids_of(take(loader, 3)) == ids_of(straight[7:10])


def test_resuming_reads_a_bounded_number_of_samples_however_far_the_run_was(tmp_path, monkeypatch):
    """The resumed stream opens the current shard at its offset and reads the shuffle buffer's samples again:
    the members it reads before its first batch do not depend on how many batches came before."""
    write_shards(tmp_path, 60, per_shard=6)
    members = Counter()
    wrapped = shards_module.tar_file_iterator

    def counting(stream, **kwargs):
        for member in wrapped(stream, **kwargs):
            members["read"] += 1
            yield member

    monkeypatch.setattr(shards_module, "tar_file_iterator", counting)
    kwargs = dict(grid=GRID, batch_size=4, mode="train", num_workers=0, seed=1, shuffle_buffer=8)
    per_sample = 3  # tokens.npy, cls, json
    read_to_resume = {}
    for k in (3, 150):  # 12 samples, and 10 epochs of the 60
        loader = build_loader(tmp_path, **kwargs)
        take(loader, k)
        state = saved(loader)
        members.clear()
        resumed = build_loader(tmp_path, **kwargs)
        resumed.load_state_dict(state)
        take(resumed, 1)
        read_to_resume[k] = members["read"]
        straight = build_loader(tmp_path, **kwargs)
        members.clear()
        take(straight, k + 1)
        assert members["read"] >= per_sample * 4 * (k + 1)  # what reading the stream again would have cost
    # the buffer (8), the next batch (4), and the member that shows a sample is complete (one per shard opened)
    bound = per_sample * (8 + 4) + 8 + 2
    assert all(n <= bound for n in read_to_resume.values()), read_to_resume


def plan_ids(state: dict, per_shard: list[int], first_id: list[int]) -> list[list[int]]:
    """Per source, the sample ids a resharded slot state has still to read, from its plan items (documented
    in nbp_ds/data/stream.py), worked out from how the test wrote the shards."""
    out = []
    for source, cursor in enumerate(state["sources"]):
        ids = []
        for item in cursor["plan"]:
            ordinals = item["only"] if "only" in item else range(item["from"], per_shard[source])
            ids += [first_id[source] + item["shard"] * per_shard[source] + o for o in ordinals]
        out.append(ids)
    return out


@pytest.mark.parametrize("old, new", [((2, 2), (1, 1)), ((1, 2), (3, 1))])
def test_another_number_of_slots_finishes_the_epoch_without_repeats_or_gaps(tmp_path, old, new):
    """Ranks x workers change between save and resume: the samples consumed before, plus what the new slots
    yield until their part of the interrupted epoch is done, are the epoch's samples, each exactly once."""
    write_shards(tmp_path / "a", 96, per_shard=8)
    write_shards(tmp_path / "b", 40, per_shard=5, offset=1000)
    spec = [{"shards": str(tmp_path / "a"), "weight": 3}, {"shards": str(tmp_path / "b")}]
    # a shuffle buffer of one: a slot yields what it reads one sample late, in order, so the first P samples
    # it yields of a source are the P samples of its plan for that source
    common = dict(grid=GRID, batch_size=2, mode="train", seed=4, shuffle_buffer=1)
    (old_world, old_workers), (new_world, new_workers) = old, new
    consumed, states = [], []
    for rank in range(old_world):
        loader = build_loader(spec, rank=rank, world_size=old_world, num_workers=old_workers, **common)
        consumed += ids_of(take(loader, 5))  # 10 samples: every old slot is still in its first epochs
        states.append(saved(loader))
    new_states = json.loads(json.dumps(reshard(states, parse_sources(spec), new_world, new_workers, 1)))
    assert sum(s["stats"].get("samples", 0) for s in new_states) == len(consumed)
    seen = list(consumed)
    for rank, state in enumerate(new_states):
        loader = build_loader(spec, rank=rank, world_size=new_world, num_workers=new_workers, **common)
        assert loader.load_state_dict(state)
        (slot_state,) = state["slots"]
        plans = plan_ids(slot_state, per_shard=[8, 5], first_id=[0, 1000])
        yielded: list[list[int]] = [[], []]
        for batch in loader:
            for i in ids_of([batch]):
                yielded[int(i >= 1000)].append(i)
            if all(len(y) >= len(p) for y, p in zip(yielded, plans, strict=True)):
                break
        for y, p in zip(yielded, plans, strict=True):
            assert y[: len(p)] == p
            seen += p
    assert sorted(seen) == list(range(96)) + list(range(1000, 1040))


def test_restore_takes_the_saved_position_or_reads_an_old_checkpoint_again(tmp_path, caplog):
    """What the trainer calls on resume (nbp_ds.data.resume.restore): this rank's record when its layout
    fits; the stream read again to the batch a checkpoint without records names; afresh, with a warning,
    when the shards changed or nothing was saved."""
    from nbp_ds.data.loader import restore

    write_shards(tmp_path / "a", 40, per_shard=5)
    kwargs = dict(grid=GRID, batch_size=3, mode="train", num_workers=2, seed=2, shuffle_buffer=4)
    straight = ids_of(take(build_loader(tmp_path / "a", **kwargs), 12))
    first = build_loader(tmp_path / "a", **kwargs)
    take(first, 5)
    state = saved(first)
    loader = build_loader(tmp_path / "a", **kwargs)
    assert restore(loader, state, lambda: [state]).startswith("continues at batch 5")
    assert ids_of(take(loader, 7)) == straight[15:]
    loader = build_loader(tmp_path / "a", **kwargs)
    assert restore(loader, None, lambda: [], replay_batches=5).startswith("reads the stream again up to batch 5")
    assert ids_of(take(loader, 7)) == straight[15:]
    write_shards(tmp_path / "b", 40, per_shard=5)
    for own, what in ((state, "the training shards changed"), (None, "no saved position")):
        loader = build_loader(tmp_path / "b", **kwargs)
        with caplog.at_level("WARNING"):
            assert restore(loader, own, lambda: []).endswith(what)
        assert ids_of(take(loader, 4)) == straight[:12]  # the same ids: b holds a copy of a
    assert "starts afresh" in caplog.text
