"""The trainer's parts on their own: LR schedule, DeepSpeed config completion,
collectives' devices, trainer state, hooks, and the checkpoint manager's files (no DeepSpeed needed)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from nbp_ds.config import load_config
from nbp_ds.errors import ConfigError
from nbp_ds.runtime import distributed
from nbp_ds.runtime.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointRef,
    CheckpointSaveError,
    find_checkpoint,
    read_latest,
)
from nbp_ds.runtime.hooks import TrainerHooks, load_hooks
from nbp_ds.runtime.metrics import console_line
from nbp_ds.runtime.schedule import lr_factor
from nbp_ds.train.ds_config import build_ds_config
from nbp_ds.train.state import TrainState


# ---- LR schedule -----------------------------------------------------------------------------------
def test_lr_factor_warmup_cosine_and_floor():
    # warmup 4 of 14 steps: (s+1)/4, then cosine from 1 down to the 0.1 floor over the remaining 10 steps
    assert [lr_factor(s, 14, 4, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 14, 4, 0.1) == pytest.approx(1.0)
    assert lr_factor(9, 14, 4, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # = 0.55
    assert lr_factor(9, 14, 4, 0.1) == pytest.approx(0.55)
    assert lr_factor(14, 14, 4, 0.1) == pytest.approx(0.1)
    assert lr_factor(1000, 14, 4, 0.1) == pytest.approx(0.1)  # past the end: stays at the floor
    assert lr_factor(0, 10, 0, 0.0) == pytest.approx(1.0)  # no warmup starts at the peak


# ---- DeepSpeed config completion ---------------------------------------------------------------------
def test_the_console_line_ends_with_the_eta():
    """The rest of the run at the interval's step time: 90 steps x 1.5 s, then 4000 x 1.5 s."""
    values = {"train/loss": 2.0, "train/acc": 0.5, "train/lr": 1e-3, "train/grad_norm": 1.0,
              "perf/tokens_per_s": 1000.0, "perf/step_time": 1.5, "perf/data_wait_share": 0.1,
              "sys/memory_gib": 1.0, "perf/mfu": 0.25}
    assert console_line(10, 100, values).endswith(" | ETA 2m15s")
    assert console_line(0, 4000, values).endswith(" | ETA 1h40m")


def test_ds_config_takes_batch_clipping_precision_and_optimizer_from_the_run_config():
    cfg = load_config("tiny", ["train.micro_batch=3", "train.grad_accum=2", "train.grad_clip=0.5",
                               "train.precision=bf16", "train.lr=2e-4", "train.weight_decay=0.1"])
    ds = build_ds_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True
    assert ds["optimizer"]["params"]["lr"] == 2e-4 and ds["optimizer"]["params"]["weight_decay"] == 0.1
    assert ds["zero_optimization"]["stage"] == 3


def test_ds_config_refuses_a_json_that_disagrees_with_the_run_config(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 7, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu.*7.*train.micro_batch"):
        build_ds_config(load_config("tiny", [f"deepspeed.config={bad}"]), world_size=1)
    bad.write_text(json.dumps({"scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(ConfigError, match="scheduler"):
        build_ds_config(load_config("tiny", [f"deepspeed.config={bad}"]), world_size=1)
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_ds_config(load_config("tiny", [f"deepspeed.config={bad}"]), world_size=1)
    with pytest.raises(ConfigError, match="nowhere.json"):
        build_ds_config(load_config("tiny", ["deepspeed.config=nowhere.json"]), world_size=1)


# what the run config owns, written out by hand for RUN_OWNED below (4 processes: 3 x 2 x 4 = 24 samples a step)
RUN_OWNED = ["train.micro_batch=3", "train.grad_accum=2", "train.grad_clip=0.5", "train.lr=2e-4",
             "train.betas=[0.9, 0.95]", "train.weight_decay=0.1"]
OWNED_KEYS = [  # (where in the JSON, the run config's value, another value)
    (("train_micro_batch_size_per_gpu",), 3, 5), (("gradient_accumulation_steps",), 2, 8),
    (("train_batch_size",), 24, 32), (("gradient_clipping",), 0.5, 1.0),
    (("optimizer", "params", "lr"), 2e-4, 3e-4), (("optimizer", "params", "betas"), [0.9, 0.95], [0.9, 0.999]),
    (("optimizer", "params", "weight_decay"), 0.1, 0.05)]


@pytest.mark.parametrize("where, ours, other", OWNED_KEYS, ids=[where[-1] for where, _, _ in OWNED_KEYS])
def test_a_users_copy_of_a_shipped_json_may_repeat_what_the_run_config_owns_but_not_contradict_it(
        tmp_path, where, ours, other):
    """README, "DeepSpeed configs": `cp ds_configs/zero3.json my_zero3.json`, edit, pass its path. Each key the run
    config owns: the same value is taken, another is refused with both values named."""
    shipped = json.loads((Path(__file__).resolve().parents[1] / "ds_configs" / "zero3.json").read_text())
    mine = tmp_path / "my_zero3.json"

    def build_with(value):
        edited = json.loads(json.dumps(shipped))
        node = edited
        for key in where[:-1]:
            node = node.setdefault(key, {})
        node[where[-1]] = value
        mine.write_text(json.dumps(edited))
        return build_ds_config(load_config("tiny", [*RUN_OWNED, f"deepspeed.config={mine}"]), world_size=4)

    ds = build_with(ours)
    node = ds
    for key in where:
        node = node[key]
    assert node == ours and ds["zero_optimization"] == shipped["zero_optimization"]
    with pytest.raises(ConfigError) as refused:
        build_with(other)
    message = str(refused.value)
    assert str(mine) in message and where[-1] in message and repr(other) in message and repr(ours) in message


def test_a_users_json_gets_bf16_from_the_precision(tmp_path):
    mine = tmp_path / "my_zero3.json"
    mine.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}))
    for precision, bf16 in (("bf16", True), ("fp32", False)):
        ds = build_ds_config(load_config("tiny", [f"train.precision={precision}", f"deepspeed.config={mine}"]), 1)
        assert ds["bf16"]["enabled"] is bf16


# ---- collectives -------------------------------------------------------------------------------------------
def test_reductions_make_their_tensors_on_the_device_they_are_given():
    # no process group here: the helper still returns a tensor on the requested device, so the trainer's
    # metric and validation sums are on the backend's device (NCCL takes CUDA tensors only)
    assert not torch.distributed.is_initialized()
    for device in (torch.device("cpu"), torch.device("meta")):
        out = distributed.all_reduce([1.0, 2.0], device=device)
        assert out.device == device and out.dtype == torch.float64
    assert distributed.all_reduce([3.0]).device == torch.device("cpu")  # gloo / no group: the CPU
    assert distributed.control_all_reduce([1.0]).device == torch.device("cpu")


def test_collective_device_follows_the_backend(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "gloo")
    assert distributed.collective_device() == torch.device("cpu")


# ---- trainer state and hooks ----------------------------------------------------------------------------------
def test_train_state_round_trips_and_refuses_unknown_keys():
    state = TrainState(step=7, batches=21, bad_steps=1, world_size=2)
    other = TrainState()
    other.load_state_dict(state.state_dict())
    assert other == state
    with pytest.raises(KeyError, match="epoch"):
        other.load_state_dict({"epoch": 3})


class CountingHooks(TrainerHooks):
    pass


def test_hooks_load_by_name_and_refuse_what_is_not_hooks():
    assert type(load_hooks(None)) is TrainerHooks
    assert type(load_hooks(f"{__name__}:CountingHooks")) is CountingHooks
    with pytest.raises(ConfigError, match="train.hooks='no.such.module:X'"):
        load_hooks("no.such.module:X")
    with pytest.raises(ConfigError, match="not a subclass"):
        load_hooks("json:JSONDecoder")


# ---- checkpoint manager (one process; the 2-rank ordering test is in test_train_deepspeed.py) ----------------
class ModelStates:
    """A part with one file, as DeepSpeed's engine writes its model states."""

    def save(self, ref) -> None:
        (ref.path / "mp_rank_00_model_states.pt").write_bytes(b"weights")

    def load(self, ref) -> None:
        assert (ref.path / "mp_rank_00_model_states.pt").read_bytes() == b"weights"


def model_manager(folder: Path, keep_last: int) -> CheckpointManager:
    manager = CheckpointManager(folder, keep_last=keep_last, rank=0)
    manager.register("engine", ModelStates())
    return manager


def test_save_moves_latest_and_keeps_exactly_keep_last(tmp_path):
    manager = model_manager(tmp_path / "ckpt", keep_last=2)
    assert manager.latest() is None
    for step in (10, 20, 30, 40):
        ref = manager.save(step)
        assert read_latest(manager.folder) == ref.tag == f"step{step:08d}"
        assert (ref.path / "rank00000_rng.pt").is_file()
    assert sorted(p.name for p in manager.folder.iterdir() if p.is_dir()) == ["step00000030", "step00000040"]
    assert not list(manager.folder.glob(".*"))  # no temporaries left


def test_pruning_never_deletes_the_checkpoint_latest_names(tmp_path):
    manager = model_manager(tmp_path, keep_last=1)
    for step in (1, 2, 3):
        manager.save(step)
    # a run resumed from an older checkpoint: 'latest' names step 1 again while newer tags exist
    (tmp_path / "step00000001").mkdir()
    (tmp_path / "latest").write_text("step00000001")
    manager._prune()
    # the newest keep_last (step 3) stay, and so does the one 'latest' names, though it is older
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step00000001", "step00000003"]
    assert read_latest(tmp_path) == "step00000001"


def test_a_dangling_latest_is_refused_with_both_names(tmp_path):
    (tmp_path / "latest").write_text("step00000500")
    with pytest.raises(CheckpointError, match=r"latest names checkpoint 'step00000500'.*does not exist"):
        read_latest(tmp_path)
    with pytest.raises(CheckpointError, match="step00000500"):
        find_checkpoint(tmp_path)


def test_find_checkpoint_accepts_run_checkpoints_and_tag_folders(tmp_path):
    manager = model_manager(tmp_path / "run" / "checkpoints", keep_last=3)
    manager.save(5)
    manager.save(6)
    expected = CheckpointRef(tmp_path / "run" / "checkpoints", "step00000006")
    assert find_checkpoint(tmp_path / "run") == expected
    assert find_checkpoint(tmp_path / "run" / "checkpoints") == expected
    assert find_checkpoint(tmp_path / "run" / "checkpoints" / "step00000005").tag == "step00000005"
    assert find_checkpoint(tmp_path / "run", tag="step00000005").step == 5
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        find_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="step00000009"):
        find_checkpoint(tmp_path / "run", tag="step00000009")


def test_a_failed_write_leaves_latest_where_it_was(tmp_path):
    manager = model_manager(tmp_path, keep_last=3)
    manager.save(1)

    class FullDisk(ModelStates):
        def save(self, ref) -> None:
            raise OSError("disk full")

    manager.register("ema", FullDisk())
    with pytest.raises(CheckpointSaveError, match=r"step00000002 was not saved \(rank 0: OSError: disk full\)"):
        manager.save(2)
    assert read_latest(tmp_path) == "step00000001"
    assert os.listdir(tmp_path / "step00000001")
    assert not (tmp_path / "step00000002").exists()  # the incomplete folder is removed


def test_deepspeed_configs_are_found_by_name_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: the JSONs are package data
    for spec in ("zero3", "zero3.json", "ds_configs/zero3.json"):
        assert build_ds_config(load_config("tiny", [f"deepspeed.config={spec}"]), 1)["zero_optimization"]["stage"] == 3
    assert build_ds_config(load_config("tiny", ["deepspeed.config=zero2"]), 1)["zero_optimization"]["stage"] == 2
    own = tmp_path / "zero3.json"  # a file of the user's wins over the shipped one of the same name
    own.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert build_ds_config(load_config("tiny", ["deepspeed.config=zero3.json"]), 1)["zero_optimization"]["stage"] == 1
    with pytest.raises(ConfigError, match="zero9.*zero2, zero3, zero3_offload"):
        build_ds_config(load_config("tiny", ["deepspeed.config=zero9"]), 1)


# ---- which GPU ------------------------------------------------------------------------------------------------
def test_each_process_computes_on_its_own_gpu_or_the_cpu(monkeypatch):
    from nbp_ds.runtime.launch import DistEnv

    env = DistEnv(rank=5, world_size=8, local_rank=1, master_addr="h", master_port=1, launcher="srun",
                  local_world_size=4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.process_device(env) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # a host's 4 GPUs, all visible to each task
    assert distributed.process_device(env) == torch.device("cuda", 1)
    assert distributed.process_device(env, "cuda") == torch.device("cuda", 1)  # its own, not cuda:0
    assert distributed.process_device(env, "cuda:0") == torch.device("cuda", 0)  # as named
    assert distributed.process_device(env, "cpu") == torch.device("cpu")


def launched(launcher_env: dict[str, str]):
    from nbp_ds.runtime import launch

    return launch.detect({"MASTER_ADDR": "node1", **launcher_env})


SRUN_4_PER_HOST = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_STEP_NODELIST": "node[1-2]",
                   "SLURMD_NODENAME": "node2", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}
TORCHRUN_4 = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}


@pytest.mark.parametrize("launcher_env, visible, expected", [
    # every task sees the host's GPUs: the local rank picks one
    ({**SRUN_4_PER_HOST, "SLURM_GPUS_ON_NODE": "4"}, 4, 2),
    (TORCHRUN_4, 4, 3),
    # srun --gpus-per-task=1 / --gpu-bind=single:1: each task sees only its own GPU, as device 0
    ({**SRUN_4_PER_HOST, "SLURM_GPUS_ON_NODE": "4"}, 1, 0),
    ({**SRUN_4_PER_HOST, "SLURM_GPUS_PER_TASK": "2", "SLURM_GPUS_ON_NODE": "8"}, 2, 0),
    (SRUN_4_PER_HOST, 1, 0),  # Slurm names no GPU count: its per-task visibility is trusted
    # fewer GPUs than processes on the host
    ({**SRUN_4_PER_HOST, "SLURM_GPUS_ON_NODE": "2"}, 2, "4 processes of this job run on this host"),
    ({**SRUN_4_PER_HOST, "SLURM_GPUS_ON_NODE": "1"}, 1, "Slurm allocated 1 on this host"),
    (TORCHRUN_4, 2, "sees 2 GPUs"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "0"}, 1, "sees 1 GPU "),
])
def test_the_gpu_is_an_index_among_the_visible_ones(monkeypatch, launcher_env, visible, expected):
    from nbp_ds.runtime.launch import LaunchError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    env = launched(launcher_env)
    if isinstance(expected, int):
        assert distributed.process_device(env) == torch.device("cuda", expected)
    else:
        with pytest.raises(LaunchError, match=expected):
            distributed.process_device(env)


def test_slurm_task_counts_per_node_are_expanded():
    from nbp_ds.runtime.launch import LaunchError, tasks_per_node

    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert tasks_per_node("8") == [8] and tasks_per_node("") == []
    assert launched(SRUN_4_PER_HOST).local_world_size == 4
    assert launched({**SRUN_4_PER_HOST, "SLURM_STEP_TASKS_PER_NODE": "3,1"}).local_world_size == 1  # node2's
    with pytest.raises(LaunchError, match="x3"):
        tasks_per_node("2x3")


# ---- the global batch -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, world, accum, ds_batch", [
    (["train.micro_batch=4", "train.grad_accum=3"], 2, 3, 24),  # not set: micro x accum x processes
    (["train.micro_batch=4", "train.global_batch=32"], 2, 4, 32),
    (["train.micro_batch=4", "train.global_batch=32"], 8, 1, 32),
    (["train.micro_batch=4", "train.global_batch=32", "train.grad_accum=4"], 2, 4, 32),  # consistent: fine
])
def test_the_global_batch_derives_the_accumulation(overrides, world, accum, ds_batch):
    from nbp_ds.train.batch import resolve_global_batch

    cfg = load_config("tiny", overrides)
    tr = resolve_global_batch(cfg.train, world)
    assert (tr.grad_accum, tr.global_batch) == (accum, ds_batch)
    ds = build_ds_config(cfg, world)
    assert (ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (accum, ds_batch)


def test_the_deepspeed_config_writes_the_batch_the_trainer_planned():
    """The trainer works the batch out once (plan_batch) and the DeepSpeed config writes that plan as given: 4 x 3
    x 2 = 24 by hand, whatever the run config's own grad_accum (1 here) would give."""
    from nbp_ds.train.batch import GlobalBatch, plan_batch

    cfg = load_config("tiny", ["train.micro_batch=4"])
    ds = build_ds_config(cfg, 2, GlobalBatch(micro_batch=4, grad_accum=3, processes=2))
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        4, 3, 24)
    with pytest.raises(ValueError, match="planned for 2 processes given for 4"):
        build_ds_config(cfg, 4, GlobalBatch(4, 3, 2))
    planned = plan_batch(load_config("tiny", ["train.micro_batch=4", "train.global_batch=32"]).train, 2)
    assert (planned.grad_accum, planned.samples) == (4, 32)


@pytest.mark.parametrize("overrides, world, message", [
    (["train.micro_batch=4", "train.global_batch=30"], 2, r"nearest global batches that work: 24 or 32, or "
                                                           r"train.micro_batch=3 \(accumulating 5\)"),
    (["train.micro_batch=4", "train.global_batch=4"], 2, r"work: 8(, |$)"),
    (["train.micro_batch=4", "train.global_batch=32", "train.grad_accum=2"], 2, "contradicts"),
])
def test_a_global_batch_that_does_not_divide_is_refused_with_sizes_that_do(overrides, world, message):
    from nbp_ds.train.batch import resolve_global_batch

    with pytest.raises(ConfigError, match=message):
        resolve_global_batch(load_config("tiny", overrides).train, world)


# ---- DeepSpeed JSON keys from the command line -----------------------------------------------------------------
def test_deepspeed_json_keys_are_set_from_the_command_line():
    cfg = load_config("tiny", ["deepspeed.set.zero_optimization.stage3_prefetch_bucket_size=1e8",
                               "deepspeed.set.zero_optimization.offload_optimizer.device=cpu",
                               "deepspeed.set.wall_clock_breakdown=true", "deepspeed.set.steps_per_print=50"])
    ds = build_ds_config(cfg, 1)
    zero = ds["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == 100_000_000 and isinstance(zero["stage3_prefetch_bucket_size"], int)
    assert zero["offload_optimizer"] == {"device": "cpu"}  # a new mapping inside the file's
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 200_000_000  # the file's other keys stay
    assert ds["wall_clock_breakdown"] is True and ds["steps_per_print"] == 50
    assert build_ds_config(load_config("tiny"), 1)["zero_optimization"]["stage3_prefetch_bucket_size"] == 50_000_000


@pytest.mark.parametrize("key, owner", [
    ("train_batch_size=64", "train.global_batch"),
    ("gradient_accumulation_steps=2", "train.grad_accum"),
    ("train_micro_batch_size_per_gpu=2", "train.micro_batch"),
    ("gradient_clipping=0.5", "train.grad_clip"),
    ("bf16.enabled=false", "train.precision"),
    ("optimizer.params.lr=0.1", "train.lr"),
    ("optimizer.type=Adam", "the optimizer's type is part of the experiment"),
    ("scheduler.type=WarmupLR", "train.warmup_steps"),
    ("checkpoint.load_universal=true", "--universal"),
])
def test_deepspeed_keys_the_run_config_owns_are_refused_with_the_reason(key, owner):
    cfg = load_config("tiny", [f"deepspeed.set.{key}"])
    with pytest.raises(ConfigError, match=rf"deepspeed.set.{key.split('=')[0]}: the run config decides this "
                                          rf"DeepSpeed key, from .*{owner}"):
        build_ds_config(cfg, 1)
    with pytest.raises(ConfigError, match="deepspeed.set must be a mapping"):
        load_config("tiny", ["deepspeed.set=5"])


def test_the_readmes_global_batch_example_and_the_logged_batch_and_deepspeed_keys(caplog):
    """docs/configuration.md: `train.global_batch=512 train.micro_batch=32` accumulates 2 on 8 GPUs (512 / (32 x 8)),
    1 on 16 (512 / (32 x 16)); the log states the effective batch in the page's words; each deepspeed.set key is
    logged."""
    import logging

    from nbp_ds.train.batch import describe, resolve_global_batch

    cfg = load_config("tiny", ["train.global_batch=512", "train.micro_batch=32",
                               "deepspeed.set.zero_optimization.reduce_bucket_size=5e8",
                               "deepspeed.set.wall_clock_breakdown=true"])
    on_8, on_16 = (resolve_global_batch(cfg.train, world) for world in (8, 16))
    assert (on_8.grad_accum, on_16.grad_accum) == (2, 1)
    line = "global batch 512 samples = micro-batch 32 x 2 accumulation steps x 8 processes"
    page = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    assert describe(on_8, 8) == line and f"(`{line}`)" in page
    with caplog.at_level(logging.INFO, logger="nbp_ds.train.ds_config"):
        build_ds_config(cfg, 8)
    logged = [r.getMessage() for r in caplog.records]
    assert "DeepSpeed config: zero_optimization.reduce_bucket_size = 500000000 (deepspeed.set)" in logged
    assert "DeepSpeed config: wall_clock_breakdown = True (deepspeed.set)" in logged


class CountPart:
    """A stateful part with a file of its own: a number, and the order the walk reached it in."""

    def __init__(self, name: str, value: int, order: list[str]):
        self.name, self.value, self.order = name, value, order

    def save(self, ref) -> None:
        (ref.path / f"{self.name}.txt").write_text(str(self.value))
        self.order.append(f"save {self.name}")

    def load(self, ref) -> None:
        self.value = int((ref.path / f"{self.name}.txt").read_text())
        self.order.append(f"load {self.name}")


def test_registered_parts_are_saved_and_restored_by_one_walk_with_the_rng_streams_last(tmp_path):
    order: list[str] = []
    manager = CheckpointManager(tmp_path, keep_last=2, rank=0)
    engine, data = CountPart("engine", 7, order), CountPart("data", 3, order)
    manager.register("engine", engine)
    manager.register("data", data)
    with pytest.raises(ValueError, match="'data' is already registered"):
        manager.register("data", data)
    assert list(manager.parts) == ["engine", "data", "rng"]
    torch.manual_seed(5)
    ref = manager.save(1, written=lambda ref: order.append(f"written {ref.tag}"))
    expected = torch.rand(3)  # the draw that follows the saved RNG state
    assert order == ["save engine", "save data", "written step00000001"]
    assert (ref.path / "rank00000_rng.pt").stat().st_mtime_ns >= (ref.path / "data.txt").stat().st_mtime_ns
    engine.value = data.value = 0
    torch.rand(10)
    manager.load(ref)
    assert order[-2:] == ["load engine", "load data"] and (engine.value, data.value) == (7, 3)
    assert torch.equal(torch.rand(3), expected)
