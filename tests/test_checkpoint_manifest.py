"""Checkpoints verified before a resume (issue 24 item 5), in one process: real files written through the
checkpoint manager, damaged the ways a disk or a copy damages them. The two-process DeepSpeed form is in
tests/test_train_faults.py."""

from __future__ import annotations

import json
import logging
import random
import re
import zlib

import pytest

from nbp_ds.errors import CheckpointError
from nbp_ds.runtime.checkpoint import CheckpointManager, CheckpointRef, save_rank_state
from nbp_ds.runtime.manifest import MANIFEST, shares


class OptimizerStates:
    """Two 'rank' files of different sizes, like a save's model and optimizer states, and a per-rank record."""

    def save(self, ref):
        (ref.path / "zero_pp_rank_0_optim_states.pt").write_bytes(bytes(range(256)) * 40)
        (ref.path / "zero_pp_rank_1_optim_states.pt").write_bytes(b"rank one" * 100)
        save_rank_state(ref, 0, {"step": ref.step})

    def load(self, ref):
        pass


@pytest.fixture
def saved(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3, rank=0)
    manager.register("optimizer", OptimizerStates())
    for step in (5, 10):
        manager.save(step)
    return manager


def test_the_manifest_lists_every_file_with_its_size_and_hash(saved):
    folder = saved.folder / "step00000010"
    record = json.loads((folder / MANIFEST).read_text())
    assert record["step"] == 10 and record["world_size"] == 1 and record["hash"] == "crc32"
    on_disk = {p.name for p in folder.iterdir() if p.name != MANIFEST}
    assert set(record["files"]) == on_disk == {"zero_pp_rank_0_optim_states.pt", "zero_pp_rank_1_optim_states.pt",
                                               "rank00000_rng.pt", "rank00000_data.json"}
    data = (folder / "zero_pp_rank_0_optim_states.pt").read_bytes()
    assert record["files"]["zero_pp_rank_0_optim_states.pt"] == {"size": 10240, "crc32": f"{zlib.crc32(data):08x}"}


def test_an_intact_latest_is_the_one_to_resume(saved):
    assert saved.latest_intact().tag == "step00000010"


@pytest.mark.parametrize("damage, says", [
    ("truncate", "has 400 bytes, the manifest 800 (truncated"),
    ("flip", "does not match its crc32 hash"),
    ("delete", "is missing"),
])
def test_a_damaged_latest_falls_back_to_the_newest_intact_one_naming_the_bad_file(saved, caplog, damage, says):
    bad = saved.folder / "step00000010" / "zero_pp_rank_1_optim_states.pt"
    data = bad.read_bytes()
    if damage == "truncate":
        bad.write_bytes(data[:400])
    elif damage == "flip":
        bad.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:
        bad.unlink()
    with caplog.at_level(logging.WARNING):
        ref = saved.latest_intact()
    assert ref.tag == "step00000005"
    assert f"{bad} {says}" in caplog.text
    assert "resuming from" in caplog.text and "step00000005" in caplog.text


def test_with_no_intact_checkpoint_resuming_is_an_error_not_a_start_from_step_0(saved):
    for tag in ("step00000005", "step00000010"):
        (saved.folder / tag / "rank00000_data.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"holds checkpoints \(step00000010, step00000005\) but none is intact"):
        saved.latest_intact()
    with pytest.raises(CheckpointError, match=r"step00000005 is damaged: .*rank00000_data.json has 2 bytes"):
        saved.require_intact(CheckpointRef(saved.folder, "step00000005"))


def test_an_unfinished_save_and_a_lost_latest_file_are_passed_over(saved):
    (saved.folder / "step00000015").mkdir()  # a save killed before its manifest: newer than 'latest'
    (saved.folder / "step00000015" / "zero_pp_rank_0_optim_states.pt").write_bytes(b"half")
    assert saved.latest_intact().tag == "step00000010"
    (saved.folder / "latest").unlink()  # without 'latest' the tags themselves are searched, newest first
    assert saved.latest_intact().tag == "step00000010"


def test_an_empty_folder_is_a_new_run(tmp_path):
    assert CheckpointManager(tmp_path, keep_last=3, rank=0).latest_intact() is None


def test_the_hashing_is_shared_by_bytes_and_the_same_on_every_rank():
    files = [(f"f{i}", size) for i, size in enumerate([100, 90, 50, 40, 10, 5, 5])]
    split = shares(files, 3)
    assert sorted(name for part in split for name in part) == sorted(name for name, _ in files)
    loads = sorted(sum(dict(files)[n] for n in part) for part in split)
    assert loads == [100, 100, 100]  # 100 | 90+10 | 50+40+5+5
    assert shares(list(reversed(files)), 3) == split


def random_bytes(size: int) -> bytes:
    return random.Random(size).randbytes(size)


# ---- at real sizes (issue 36): files larger than the piece the hash reads at a time, several checkpoints ----

@pytest.mark.parametrize("where", ["first piece", "middle piece", "last byte"])
def test_a_flipped_byte_anywhere_in_a_file_larger_than_the_hashing_piece_is_found(tmp_path, where):
    """Real checkpoint files are gigabytes, many times the piece :func:`manifest.hash_file` reads at a time: a
    flipped byte in a later piece must change the hash as one in the first does (size unchanged)."""
    from nbp_ds.runtime import manifest

    size = 2 * manifest._CHUNK + 4099  # three pieces, the last a partial one
    data = bytearray(random_bytes(size))
    position = {"first piece": 17, "middle piece": manifest._CHUNK + 12345, "last byte": size - 1}[where]
    (tmp_path / "big.pt").write_bytes(bytes(data))
    record = {"files": manifest.hash_files(tmp_path, ["big.pt"])}
    assert record["files"]["big.pt"]["crc32"] == f"{zlib.crc32(bytes(data)):08x}"  # the whole file, by zlib alone
    data[position] ^= 0x01
    (tmp_path / "big.pt").write_bytes(bytes(data))
    assert manifest.check_files(tmp_path, record, ["big.pt"]) == [
        f"{tmp_path / 'big.pt'} does not match its crc32 hash in the manifest (its bytes changed)"]


def torch_free_random_bytes(size: int) -> bytes:
    import random

    return random.Random(size).randbytes(size)


@pytest.fixture
def four_saved(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=4, rank=0)
    manager.register("optimizer", OptimizerStates())
    for step in (5, 10, 15, 20):
        manager.save(step)
    return manager


@pytest.mark.parametrize("damaged, expected", [
    ((20,), 15),  # the one just before latest, not an older one (which would redo steps)
    ((20, 15), 10),
    ((20, 15, 10), 5),
    ((15,), 20),  # a damaged older one does not matter while latest is intact
])
def test_the_fallback_takes_the_newest_intact_of_several_earlier_checkpoints(four_saved, caplog, damaged, expected):
    for step in damaged:
        bad = four_saved.folder / f"step{step:08d}" / "zero_pp_rank_0_optim_states.pt"
        data = bad.read_bytes()
        bad.write_bytes(data[:5000] + bytes([data[5000] ^ 0x80]) + data[5001:])
    with caplog.at_level(logging.WARNING):
        assert four_saved.latest_intact().tag == f"step{expected:08d}"
    assert sorted(int(s) for s in re.findall(r"step(\d{8}) is damaged", caplog.text)) \
        == sorted(s for s in damaged if s > expected)


def test_past_ten_to_the_eight_steps_the_order_is_by_step_not_by_text(tmp_path, caplog):
    # tag_for pads to 8 digits; step 100,000,000 has 9 and sorts as text before step 99,999,999 ("step1" < "step9")
    manager = CheckpointManager(tmp_path, keep_last=2, rank=0)
    manager.register("optimizer", OptimizerStates())
    for step in (99_999_998, 99_999_999, 100_000_000):
        manager.save(step)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step100000000", "step99999999"]
    (tmp_path / "step100000000" / "zero_pp_rank_1_optim_states.pt").unlink()
    with caplog.at_level(logging.WARNING):
        assert manager.latest_intact().tag == "step99999999"
