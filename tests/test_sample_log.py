"""Sample videos in TensorBoard during training: nbp-train adds the sample hook (nbp_ds.sample_log), which
generates with the model being trained and decodes with train.sample_tokenizer."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_helpers import make_shards, run, step_losses, train_cmd

from nbp_ds.tokenizer import build_tokenizer


@pytest.mark.slow
def test_training_logs_sample_videos_at_sample_every(tmp_path):
    shards, out, tokenizer = tmp_path / "shards", tmp_path / "out", tmp_path / "tokenizer"
    make_shards(shards, train=40, val=8)
    build_tokenizer("tiny").save(tokenizer)  # a folder, as a trained tokenizer is (built, then its weights read)
    result = run(train_cmd(out, shards, "train.steps=8", "train.sample_every=4", f"train.sample_tokenizer={tokenizer}",
                           "train.eval_every=0", "train.save_every=0", "deepspeed.config=zero2", nproc=1))
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    # one video per class (tiny: 4 classes, tagged by id, named when the shards say) and the grid of them all
    assert "samples/grid" in tags and len([t for t in tags if t != "samples/grid"]) == 4
    for tag in tags:
        assert [image.step for image in events.Images(tag)] == [4, 8]
        assert all(image.width > 0 and image.height > 0 for image in events.Images(tag))
    # logging samples changes nothing the run learns: the same run without them logs the same losses at every step
    # (building the sample tokenizer draws from torch's generators, which class dropout reads after step 4)
    quiet = tmp_path / "quiet"
    result = run(train_cmd(quiet, shards, "train.steps=8", "train.sample_every=0", "train.eval_every=0",
                           "train.save_every=0", "deepspeed.config=zero2", nproc=1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert step_losses(quiet) == step_losses(out) and len(step_losses(out)) == 8
