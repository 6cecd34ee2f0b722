"""A finished multi-process run exits 0 on every rank (issue 36), for the tokenizer trainer (DDP over gloo, under
torchrun); the transformer trainer's is tests/test_train_deepspeed.py's
test_a_finished_run_ends_every_rank_with_0_before_the_interpreters_shutdown. Both run under the probe of
tests/data/shutdown_probe, which fails a rank whose interpreter begins its shutdown with gloo's threads alive, the
condition in which a finished rank aborted now and then."""

from __future__ import annotations

import subprocess
import sys

import pytest
from train_helpers import ROOT, env, with_shutdown_probe
from video_fixtures import dataset

pytestmark = pytest.mark.slow


def test_a_finished_two_process_tokenizer_run_ends_every_rank_with_0(tmp_path):
    videos = dataset(tmp_path / "videos", classes=2, per_class=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "nbp_ds.cli.train_tokenizer", "--videos", str(videos), "--out", str(tmp_path / "run"),
           "--preset", "tiny", "--frames", "5", "--resolution", "16", "--batch-size", "1", "--workers", "1",
           "--steps", "2", "--warmup", "1", "--log-every", "1", "--image-every", "1000", "train.threads=1"]
    result = subprocess.run(cmd, cwd=ROOT, env={**env(), **with_shutdown_probe()}, capture_output=True, text=True,
                            timeout=600)
    assert "the interpreter's shutdown began with gloo's threads running" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "leaked semaphore" not in result.stderr, result.stderr[-3000:]  # its clip loader's worker closed first
    assert (tmp_path / "run" / "report.json").is_file()
