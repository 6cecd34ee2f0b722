"""Packed training through the trainer and its settings: data.pack_tokens, train.global_batch_tokens, the
refusals, and one short run that trains on clips of four grids and logs data/padding_fraction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from train_helpers import run

from nbp_ds.config import load_config
from nbp_ds.data import TokenShardWriter
from nbp_ds.errors import ConfigError
from nbp_ds.train.batch import plan_batch

PACKED = ["data.pack_tokens=128", "train.micro_batch=2"]


def test_global_batch_in_tokens_sets_the_rows():
    """512 positions of rows of 128 = 4 rows: micro-batches of 2 rows on 1 process accumulate 2, on 2 processes 1."""
    cfg = load_config("tiny", [*PACKED, "train.global_batch_tokens=512"])
    assert (plan_batch(cfg.train, 1, 128).grad_accum, plan_batch(cfg.train, 2, 128).grad_accum) == (2, 1)
    assert plan_batch(cfg.train, 1, 128).samples == 4


@pytest.mark.parametrize("overrides, fragment", [
    (["train.global_batch_tokens=500"], "must be a positive multiple of data.pack_tokens=128"),
    (["train.global_batch_tokens=512", "train.global_batch=2"], "contradicts train.global_batch_tokens=512"),
    (["data.pack_tokens=0", "train.global_batch_tokens=512"], "needs data.pack_tokens > 0"),
    (["data.pack_tokens=40"], r"data.pack_tokens=40 is shorter than one clip of layout.grid=\[3, 4, 4\] \(49"),
    (["model.attention=flash"], "data.pack_tokens cannot run with model.attention=flash"),
    (["model.arch=gpt2"], "data.pack_tokens needs model.arch=llama"),
    (["data.pack_tokens=-1"], "data.pack_tokens must be >= 0"),
    (["train.sequence_parallel=2"], r"data.pack_tokens=128 with train.sequence_parallel=2"),
])
def test_packing_settings_are_refused_by_name(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config("tiny", [*PACKED, *overrides])


def mixed_shards(folder: Path) -> Path:
    """Class patterns on clips of four grids (49, 17, 65 and 33 positions with the tiny layout)."""
    grids = [(3, 4, 4), (1, 4, 4), (2, 4, 8), (2, 4, 4)]
    for split, n in (("train", 96), ("val", 16)):
        with TokenShardWriter(folder / split, maxcount=24) as writer:
            for i in range(n):
                grid, label = grids[i % 4], i % 4
                writer.write(f"{split}{i:05d}", ((np.arange(np.prod(grid)) * (label + 1)) % 64).reshape(grid),
                             label, {})
    return folder


@pytest.mark.slow
def test_a_packed_run_trains_validates_and_logs_its_padding(tmp_path):
    shards, out = mixed_shards(tmp_path / "shards"), tmp_path / "run"
    result = run(["python", "-m", "nbp_ds.train", "--config", "tiny", f"data.train={shards / 'train'}",
                  f"data.val={shards / 'val'}", f"train.out_dir={out}", *PACKED, "train.global_batch_tokens=512",
                  "train.steps=3", "train.eval_every=3", "train.save_every=3", "train.log_every=1"])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    last = steps[-1]
    assert last["data/batches"] == 6  # 4 rows a step, 2 per micro-batch
    assert last["data/pack_positions"] == 3 * 512
    assert last["data/padding_fraction"] == pytest.approx(last["data/pack_padding"] / last["data/pack_positions"])
    assert 0 < last["data/padding_fraction"] < 0.5
    assert np.isfinite([r["val/loss"] for r in rows if "val/loss" in r]).all()
    assert json.loads((out / "config.json").read_text())["train"]["global_batch"] == 4
    summary = json.loads((out / "summary.json").read_text())  # clips and real tokens, not rows and row positions
    assert summary["samples"] == last["data/samples"]
    assert summary["tokens"] == last["data/pack_positions"] - last["data/pack_padding"]
