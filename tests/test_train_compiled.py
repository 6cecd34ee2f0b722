"""The DeepSpeed trainer with compiled layers on two CPU processes: under ZeRO-3 (every parameter partitioned)
with selective activation checkpointing, and under ZeRO-2 with full checkpointing, the same losses as the eager
ZeRO-3 run, and no recompilation.

Tolerance: compiled and eager fp32 differ by summation order only, and ZeRO-2 and ZeRO-3 apply the same
averaged gradients; over 6 steps the logged losses agree to rtol 1e-4."""

from __future__ import annotations

import pytest
from train_helpers import make_shards, run, step_losses, train_cmd

pytestmark = pytest.mark.slow

STEPS = ["train.steps=6", "train.save_every=0", "train.eval_every=0", "data.num_workers=0", "model.class_dropout=0.0"]
ZERO3 = "deepspeed.config=tests/data/zero3_no_persistence.json"
ZERO2 = "deepspeed.config=ds_configs/zero2.json"


def test_compiled_training_under_zero3_and_zero2_equals_eager(tmp_path):
    shards = tmp_path / "shards"
    make_shards(shards, train=64, val=8)
    runs = {"eager": [ZERO3, "model.compile=false"],
            "zero3-compiled-selective": [ZERO3, "model.compile=true", "train.activation_checkpointing=selective"],
            "zero2-compiled-full": [ZERO2, "model.compile=true", "train.activation_checkpointing=full"]}
    losses = {}
    for name, overrides in runs.items():
        result = run(train_cmd(tmp_path / name, shards, *STEPS, *overrides), timeout=600, TORCH_LOGS="recompiles")
        assert result.returncode == 0, name + result.stdout[-3000:] + result.stderr[-5000:]
        # one graph serves every layer and step
        assert "Recompiling function" not in result.stdout + result.stderr, name
        losses[name] = step_losses(tmp_path / name)
        assert sorted(losses[name]) == list(range(1, 7)), name
    for name in runs:
        for step, loss in losses["eager"].items():
            assert losses[name][step] == pytest.approx(loss, rel=1e-4), (name, step, losses)
