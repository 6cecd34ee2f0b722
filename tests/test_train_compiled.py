"""The DeepSpeed trainer with compiled layers and selective activation checkpointing under ZeRO-3 (every
parameter partitioned, two CPU processes): the same losses as the eager run, and no recompilation.

Tolerance: compiled and eager fp32 differ by summation order only; over 6 steps the logged losses agree to
rtol 1e-4."""

from __future__ import annotations

import pytest
from train_helpers import make_shards, run, step_losses, train_cmd

pytestmark = pytest.mark.slow

STEPS = ["train.steps=6", "train.save_every=0", "train.eval_every=0", "data.num_workers=1",
         "deepspeed.config=tests/data/zero3_no_persistence.json", "model.class_dropout=0.0"]


def test_zero3_compiled_selective_checkpointing_equals_eager(tmp_path):
    shards = tmp_path / "shards"
    make_shards(shards, train=64, val=8)
    eager = run(train_cmd(tmp_path / "eager", shards, *STEPS, "model.compile=false"))
    assert eager.returncode == 0, eager.stdout[-3000:] + eager.stderr[-3000:]
    compiled = run(train_cmd(tmp_path / "compiled", shards, *STEPS, "model.compile=true",
                             "train.activation_checkpointing=selective"), timeout=600, TORCH_LOGS="recompiles")
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-5000:]
    assert "Recompiling function" not in compiled.stdout + compiled.stderr  # one graph serves every layer and step
    a, b = step_losses(tmp_path / "eager"), step_losses(tmp_path / "compiled")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a, b)
