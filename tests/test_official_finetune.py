"""Fine-tuning a converted release with the DeepSpeed trainer: ZeRO-3 (two processes) starts from its weights."""

from __future__ import annotations

import sys

import pytest
import torch
from official_fixtures import write_generator_ckpt
from safetensors.torch import load_file
from train_helpers import make_shards, run

from nbp_ds.official.generator import convert_generator
from nbp_ds.weights.export import consolidate

pytestmark = pytest.mark.slow


def test_zero3_run_starts_from_the_converted_weights(tmp_path):
    shards = make_shards(tmp_path / "shards", train=64, val=8)[0].parent  # 3x4x4 tokens < 64, as the fixture's model
    write_generator_ckpt(tmp_path / "k600.ckpt", "k600")
    weights = tmp_path / "k600.safetensors"
    convert_generator(tmp_path / "k600.ckpt", weights)
    out = tmp_path / "run"
    # a learning rate so small that two AdamW steps leave the weights where they started (|update| ~ lr)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "nbp_ds.train", "--config", str(weights.with_suffix(".json")), f"train.init_from={weights}",
           f"data.train={shards / 'train'}", f"data.val={shards / 'val'}", f"train.out_dir={out}", "train.steps=2",
           "train.micro_batch=2", "train.lr=1.0e-9", "train.warmup_steps=0", "train.precision=fp32",
           "train.log_every=1", "train.save_every=2", "train.eval_every=0", "data.num_workers=0",
           "deepspeed.config=tests/data/zero3_no_persistence.json"]
    result = run(cmd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "initialized" in result.stderr + result.stdout
    after, _ = consolidate(out)  # the run's last checkpoint, gathered from both ranks' ZeRO-3 shards
    before = load_file(str(weights))
    assert sorted(before) == sorted(after)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-6, msg=key)
