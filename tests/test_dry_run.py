"""Before a job waits in a queue: ``nbp-train --dry-run`` and ``--print-config`` for a world size given by number,
and "auto" in a DeepSpeed JSON filled from the run config."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import make_shards, run

from nbp_ds.config import load_config
from nbp_ds.errors import ConfigError
from nbp_ds.model import build_model
from nbp_ds.perf import dry_run as dry
from nbp_ds.runtime import distributed
from nbp_ds.train.ds_config import build_ds_config, resolved_configs

SHIPPED = Path(__file__).resolve().parents[1] / "nbp_ds" / "ds_configs"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    make_shards(folder, train=40, val=8)
    return folder


def tiny(shards: Path, *overrides: str):
    return load_config("tiny", [f"data.train={shards / 'train'}", f"data.val={shards / 'val'}", *overrides])


@pytest.fixture
def no_process_group(monkeypatch):
    """A dry run that tried to join a process group fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the dry run started a process group")

    monkeypatch.setattr(distributed, "init_process_group", refuse)
    monkeypatch.setattr(torch.distributed, "init_process_group", refuse)
    yield
    assert not torch.distributed.is_initialized()


def test_a_dry_run_for_64_ranks_resolves_counts_estimates_reads_and_steps(shards, no_process_group):
    cfg = tiny(shards, "train.global_batch=512", "train.micro_batch=2")
    checked = dry.dry_run(*resolved_configs(cfg, 64), world_size=64,
                          gpus_per_node=8)
    # 512 samples = 2 per rank x 4 accumulation steps x 64 ranks
    assert checked.cfg.train.grad_accum == 4 and checked.ds_config["gradient_accumulation_steps"] == 4
    assert checked.ds_config["train_batch_size"] == 512
    cpu_model = build_model(tiny(shards), device="cpu")
    params = sum(p.numel() for p in cpu_model.parameters())
    assert checked.params == params
    # DeepSpeed's ZeRO-2 formula written out: 16-bit weights on every GPU, + 18 bytes/param split over 64 GPUs
    zero2 = {row.setting: row for row in checked.memory}["zero2"]
    assert zero2.gpu_bytes == 2 * params + int(18 * params / 64)
    # ZeRO-3: the 18 bytes split too, + one gathered layer in fp32 (a whole transformer layer: one leaf module)
    layer = max(sum(p.numel() for p in m.parameters()) for m in cpu_model.layers)
    outside = max(p.numel() for name, p in cpu_model.named_parameters() if not name.startswith("layers."))
    zero3 = {row.setting: row for row in checked.memory}["zero3"]
    assert zero3.gpu_bytes == 4 * max(layer, outside) + int(18 * params / 64)
    assert checked.batch_shape == (2, 3, 4, 4) and checked.stepped_layers == 2
    assert 3.0 < checked.loss < 6.0  # about ln(64) for a fresh model over 64 codes
    report = checked.report()
    assert "8 nodes x 8" in report and "zero3 " in report.split("<- this run")[0].splitlines()[-1]


@pytest.mark.parametrize("overrides, world, message", [
    (["train.global_batch=10"], 4, "train.global_batch=10 is not a multiple"),
    (["data.train=/nowhere/shards"], 2, "/nowhere/shards"),
    (["data.val=/nowhere/val"], 2, "/nowhere/val"),
    (["train.grad_clip=0.5"], 12, "not a whole number of nodes"),
])
def test_a_dry_run_refuses_bad_batches_and_shards_before_any_process_group(shards, no_process_group, overrides,
                                                                           world, message):
    with pytest.raises(ConfigError, match=message):
        dry.dry_run(*resolved_configs(tiny(shards, *overrides), world), world_size=world, gpus_per_node=8)


def test_a_model_too_large_for_this_machine_steps_as_a_one_layer_copy(shards, no_process_group, monkeypatch):
    monkeypatch.setattr(dry, "free_memory", lambda device: 1000)
    checked = dry.dry_run(*resolved_configs(tiny(shards), 2), world_size=2)
    assert checked.stepped_layers == 1 and checked.cfg.model.n_layer == 2
    assert "1-layer copy of the model" in checked.report()


def test_nbp_train_dry_run_and_print_config_on_the_command_line(shards, tmp_path):
    base = [sys.executable, "-m", "nbp_ds.train", "--config", "tiny", f"data.train={shards / 'train'}",
            f"data.val={shards / 'val'}", f"train.out_dir={tmp_path / 'run'}"]
    result = run([*base, "--dry-run", "--world-size", "4"], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dry run passed" in result.stdout and not (tmp_path / "run").exists()  # nothing written, no launch
    result = run([*base, "--print-config", "--world-size", "3", "train.micro_batch=5"], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout.split("# DeepSpeed config for 3 processes\n", 1)[1])
    assert printed["train_batch_size"] == 15 and printed["optimizer"]["params"]["fused"] is True
    result = run([*base, "--dry-run", "--world-size", "4", "train.stepz=3"], timeout=120)
    assert result.returncode == 2 and "train.stepz" in result.stderr


# ---- "auto" in a DeepSpeed JSON -----------------------------------------------------------------------------

AUTO_JSON = {  # the Hugging Face way of writing a DeepSpeed JSON: the trainer fills the "auto" values
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "weight_decay": "auto", "eps": 1e-8}},
    "zero_optimization": {"stage": 3, "overlap_comm": True},
}


def test_auto_values_are_filled_from_the_run_config(tmp_path):
    path = tmp_path / "hf_style.json"
    path.write_text(json.dumps(AUTO_JSON))
    cfg = load_config("tiny", [f"deepspeed.config={path}", "train.micro_batch=3", "train.global_batch=24",
                               "train.grad_clip=0.25", "train.precision=bf16", "train.lr=2e-4",
                               "train.betas=[0.8, 0.9]", "train.weight_decay=0.01"])
    ds = build_ds_config(cfg, world_size=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        24, 3, 4)  # 24 = 3 x 4 x 2
    assert ds["gradient_clipping"] == 0.25 and ds["bf16"] == {"enabled": True}
    assert ds["optimizer"]["params"] == {"lr": 2e-4, "betas": [0.8, 0.9], "weight_decay": 0.01, "eps": 1e-8}
    assert ds["zero_optimization"] == AUTO_JSON["zero_optimization"]
    assert "auto" not in json.dumps(ds)


def test_auto_is_refused_where_the_run_config_has_no_value(tmp_path):
    path = tmp_path / "hf_style.json"
    path.write_text(json.dumps({**AUTO_JSON, "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}))
    with pytest.raises(ConfigError, match=r"zero_optimization.reduce_bucket_size is \"auto\""):
        build_ds_config(load_config("tiny", [f"deepspeed.config={path}"]), world_size=1)


def test_the_shipped_gpu_configs_use_torchs_fused_adamw_and_offload_keeps_cpu_adam():
    for name in ("zero2", "zero3"):
        params = json.loads((SHIPPED / f"{name}.json").read_text())["optimizer"]["params"]
        assert params == {"torch_adam": True, "fused": True}, name
    # optimizer offload steps on the CPU with DeepSpeed's CPUAdam, which torch_adam would replace
    assert json.loads((SHIPPED / "zero3_offload.json").read_text())["optimizer"]["params"] == {}
