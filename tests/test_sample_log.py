"""Sample videos in TensorBoard during training: nbp-train adds the sample hook (nbp_ds.sample_log), which
generates with the model being trained and decodes with train.sample_tokenizer."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_helpers import make_shards, run, train_cmd


@pytest.mark.slow
def test_training_logs_sample_videos_at_sample_every(tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "out"
    make_shards(shards, train=40, val=8)
    result = run(train_cmd(out, shards, "train.steps=4", "train.sample_every=2", "train.sample_tokenizer=random:tiny",
                           "train.eval_every=0", "train.save_every=0", "deepspeed.config=zero2", nproc=1))
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    # one video per class (tiny: 4 classes, tagged by id, named when the shards say) and the grid of them all
    assert "samples/grid" in tags and len([t for t in tags if t != "samples/grid"]) == 4
    for tag in tags:
        assert [image.step for image in events.Images(tag)] == [2, 4]
        assert all(image.width > 0 and image.height > 0 for image in events.Images(tag))
