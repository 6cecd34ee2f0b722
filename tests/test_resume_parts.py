"""The parts of a resume on another number of processes that need no training run: per-rank records in
checkpoints, the saved world size, the universal conversion's failure path, and the --universal flag."""

from __future__ import annotations

import threading

import pytest
import torch

from nbp_ds.runtime.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointRef,
    save_rank_state,
    saved_world_size,
    universal_checkpoint,
    with_universal_load,
)


def test_every_rank_keeps_its_record_and_a_new_rank_can_read_them_all(tmp_path):
    # two ranks of one save without a process group (its collectives see one rank): rank 0 saves, then
    # rank 1 writes its part of the same tag folder
    class Position:
        def save(self, ref):
            save_rank_state(ref, 0, {"rank": 0, "slots": [[1, 2]]})

        def load(self, ref):
            pass

    ref = CheckpointRef(tmp_path, "step00000007")
    manager = CheckpointManager(tmp_path, keep_last=2, rank=0)
    manager.register("data", Position())
    manager.save(7)
    save_rank_state(ref, 1, {"rank": 1, "slots": [[1, 2]]})
    assert CheckpointManager.rank_state(ref, 1) == {"rank": 1, "slots": [[1, 2]]}
    assert CheckpointManager.rank_state(ref, 2) is None  # a rank the checkpoint did not have
    assert [s["rank"] for s in CheckpointManager.rank_states(ref)] == [0, 1]


def test_the_saved_world_size_comes_from_the_train_state_else_from_the_optimizer_files(tmp_path):
    ref = CheckpointRef(tmp_path, "step00000001")
    ref.path.mkdir()
    assert saved_world_size(ref) is None
    for rank in range(3):
        (ref.path / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert saved_world_size(ref) == 3
    torch.save({"train_state": {"world_size": 4}}, ref.path / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    assert saved_world_size(ref) == 4


def test_a_failed_conversion_is_named_on_every_rank(tmp_path):
    ref = CheckpointRef(tmp_path, "step00000001")
    ref.path.mkdir()  # holds no DeepSpeed checkpoint: ds_to_universal fails
    waiting: list[BaseException] = []

    def other_rank():
        try:
            universal_checkpoint(ref, rank=1, poll_s=0.05)
        except CheckpointError as exc:
            waiting.append(exc)

    thread = threading.Thread(target=other_rank)
    thread.start()
    with pytest.raises(CheckpointError, match=r"ds_to_universal could not convert .*universal.log"):
        universal_checkpoint(ref, rank=0)
    thread.join(timeout=30)
    assert waiting and "failed on rank 0" in str(waiting[0])
    assert not (ref.path / "universal").exists()
    assert with_universal_load({"zero_optimization": {"stage": 3}}) == {
        "zero_optimization": {"stage": 3}, "checkpoint": {"load_universal": True}}


def test_the_universal_flag_reaches_the_trainer(monkeypatch):
    import nbp_ds.train.loop as loop
    from nbp_ds.cli import train as cli

    calls = []
    monkeypatch.setattr(loop, "train",
                        lambda cfg, resume=None, universal=None, hooks=None: calls.append((resume, universal)))
    cli.main(["--config", "tiny", "--resume", "runs/x", "--universal"])
    cli.main(["--config", "tiny", "--resume", "runs/x"])
    assert calls == [("runs/x", True), ("runs/x", None)]  # None: decided by the saved world size
    assert "--universal" in cli.build_parser().format_help()
