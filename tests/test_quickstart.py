"""The quickstart end to end with reduced sizes: every stage runs for real (ffmpeg, tokenizer training,
shards, 2-process DeepSpeed ZeRO-3, export, sampling, the class check), and a second run reuses them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_quickstart_end_to_end_and_reuse(tmp_path):
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "nbp_ds.cli.quickstart", "--out", str(out), "--per-class", "3", "--val-per-class", "1",
           "--tokenizer-steps", "10", "--train-steps", "6", "train.save_every=6", "train.eval_every=6",
           "train.sample_every=6", "train.log_every=2", "model.n_layer=1"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    samples = out / "samples"
    assert len(list(samples.glob("*.mp4"))) == 12  # one per class
    assert (samples / "grid.png").stat().st_size > 0
    report = json.loads((samples / "consistency.json").read_text())
    assert 0.0 <= report["overall_rate"] <= 1.0 and report["count"] == 12
    assert list((out / "train" / "tb").glob("events.out.tfevents.*"))
    assert (out / "train" / "finished").is_file()
    tok_report = json.loads((out / "tokenizer" / "report.json").read_text())
    assert tok_report["steps"] == 10 and tok_report["val_psnr"] > 0
    for where in ("Look at:", str(samples), "tensorboard --logdir"):
        assert where in first.stdout
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:]
    assert second.stdout.count("done in an earlier run, reused") == 7
