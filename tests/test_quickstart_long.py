"""The quickstart's stage 8 (long): one long sample per class, every class in one batch, and the consistency
check window by window, printed and in long_samples/windows.json; a second run reuses the stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_sample_tool import write_export

from nbp_ds import ffmpeg_tools
from nbp_ds.cli import quickstart
from nbp_ds.eval.synthetic import CLASSES
from nbp_ds.generate.folder import recorded_videos
from nbp_ds.tokenizer import build_tokenizer


@pytest.mark.skipif(not all(map(ffmpeg_tools.find_tool, ffmpeg_tools.TOOLS)),
                    reason=f"needs ffmpeg and ffprobe: {ffmpeg_tools.INSTALL_HINT}")
def test_the_long_stage_samples_every_class_in_one_batch_and_checks_it_window_by_window(tmp_path, capfd):
    """With an untrained quickstart-shaped model (one layer: the stage's plumbing, not its quality): 12 videos of 65
    frames, one per class, made in one batch of 12 (so one generate_long call); windows.json has the 7 whole
    9-frame windows of 65 frames, each over the 12 videos; the table is printed; a second run reuses the stage."""
    export = write_export(tmp_path / "w.safetensors")
    build_tokenizer("tiny", seed=1).save(tmp_path / "tok")
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({name: i for i, name in enumerate(CLASSES)}))
    args = quickstart.parse_args(["--out", str(tmp_path / "qs")])
    assert args.long_frames == 65  # the quickstart's default: at least 65 frames

    pipe = quickstart.Pipeline(args)
    long = pipe.long_stage(export, tmp_path / "tok", classes, len(CLASSES))
    records = recorded_videos(long)
    assert sorted(r["stem"].rsplit("_", 1)[0] for r in records) == sorted(CLASSES)
    assert all(np.load(r["frames_path"]).shape == (65, 32, 32, 3) for r in records)
    settings = json.loads((long / "sampling.json").read_text())
    assert settings["batch_size"] == len(CLASSES) == len(settings["labels"]) and settings["num"] == 1
    assert settings["long"]["latent_frames"] == 17  # 1 + 4 * 16 frames

    result = json.loads((long / "windows.json").read_text())["window_consistency"]
    assert result["window_frames"] == 9 and [w["count"] for w in result["windows"]] == [12] * 7  # 65 // 9 = 7
    capfd.readouterr()
    pipe.print_long_table(long)
    printed = capfd.readouterr().out
    assert "window by window" in printed and len(printed.strip().splitlines()) == 1 + 1 + 7

    again = quickstart.Pipeline(args)
    again.long_stage(export, tmp_path / "tok", classes, len(CLASSES))
    assert again.timings == [("long", None)]  # reused: the same inputs
