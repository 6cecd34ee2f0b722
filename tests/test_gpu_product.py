"""The product on one CUDA GPU: the DeepSpeed trainer with NCCL and bf16 (ZeRO-2 and ZeRO-3), resume after
SIGKILL, export -> nbp-sample writing mp4s, tokenizer training, and the 3B preset with optimizer offload.

Marked ``gpu``: skipped without CUDA (CI), run by ``make gpu-check`` on a GPU machine.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch
from train_helpers import (
    kill_group,
    make_shards,
    run,
    start,
    step_counts,
    step_losses,
    wait_for_latest,
)
from video_fixtures import dataset

from nbp_ds import ffmpeg_tools

pytestmark = pytest.mark.gpu

GPU = ["train.precision=bf16", "model.attention=flex", "data.num_workers=2"]


def gpu_env() -> dict[str, str]:
    return {"DS_ACCELERATOR": "cuda", "CUDA_VISIBLE_DEVICES": "0"}


def train_cmd(out, shards, *overrides: str) -> list[str]:
    """One process (no launcher): rank 0 of 1, NCCL on the GPU."""
    return [sys.executable, "-m", "nbp_ds.train", "--config", "tiny", f"data.train={shards / 'train'}",
            f"data.val={shards / 'val'}", f"train.out_dir={out}", "train.log_every=1", *GPU, *overrides]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    make_shards(folder)
    return folder


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_trainer_learns_validates_saves_and_resumes_on_one_gpu(zero, shards, tmp_path):
    steps = ["train.steps=30", "train.save_every=15", "train.eval_every=15", f"deepspeed.config={zero}"]
    out = tmp_path / "out"
    proc = start(train_cmd(out, shards, *steps), tmp_path / "first.log", faults={"step_sleep": 0.1}, **gpu_env())
    wait_for_latest(out, "step00000015", proc)
    kill_group(proc, signal.SIGKILL)
    proc.wait(timeout=60)
    result = run(train_cmd(out, shards, *steps), **gpu_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "resumed from" in result.stderr and "step00000015" in result.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step00000030"
    losses, counts = step_losses(out), step_counts(out)
    assert sorted(losses) == list(range(1, 31))
    assert all(counts[s] == 1 for s in range(16, 31))  # after the resume every step ran once
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (28, 29, 30)) / 3
    assert last < first - 0.5, (first, last)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["val/loss"] for r in rows if "val/loss" in r]
    assert all(r["sys/memory_gib"] > 0 for r in rows if "sys/memory_gib" in r)
    state = json.loads((out / "sharding.json").read_text())
    assert state[0]["device"].startswith("cuda") and state[0]["zero_stage"] == int(zero[-1])


def test_export_and_sample_write_playable_mp4s_on_the_gpu(shards, tmp_path):
    out = tmp_path / "out"
    result = run(train_cmd(out, shards, "train.steps=4", "train.save_every=4", "train.eval_every=0"), **gpu_env())
    assert result.returncode == 0, result.stderr[-5000:]
    weights = tmp_path / "w.safetensors"
    assert run(["python", "-m", "nbp_ds.cli.export", str(out), str(weights)]).returncode == 0
    if ffmpeg_tools.find_tool("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed on this GPU machine: mp4 writing not checked")
    samples = tmp_path / "samples"
    result = run(["python", "-m", "nbp_ds.cli.sample", "--weights", str(weights), "--tokenizer", "random:tiny",
                  "--out", str(samples), "--num", "2", "--device", "cuda"], **gpu_env())
    assert result.returncode == 0, result.stderr[-3000:]
    mp4s = sorted(samples.glob("*.mp4"))
    assert len(mp4s) == 2 * 4  # 2 per class, 4 classes
    probe = subprocess.run([ffmpeg_tools.ffprobe(), "-v", "error", "-count_frames", "-select_streams", "v:0",
                            "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0",
                            str(mp4s[0])], capture_output=True, text=True)
    assert probe.returncode == 0 and int(probe.stdout.strip()) == 9  # 3 latent frames of random:tiny -> 9 frames


def test_tokenizer_trains_on_the_gpu(tmp_path):
    if ffmpeg_tools.find_tool("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed on this GPU machine: no videos to train on")
    videos = dataset(tmp_path / "videos", classes=2, per_class=2)
    cmd = ["python", "-m", "nbp_ds.cli.train_tokenizer", "--videos", str(videos), "--out", str(tmp_path / "tok"),
           "--preset", "tiny", "--frames", "9", "--resolution", "32", "--steps", "5", "--batch-size", "4",
           "--device", "cuda", "--workers", "2", "--log-every", "1"]
    result = run(cmd, **gpu_env())
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "tok" / "report.json").read_text())
    assert report["steps"] == 5 and report["val_psnr"] > 0


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < 70 * 2**30,
                    reason="the 3B check needs an 80 GB GPU")
def test_3b_preset_with_optimizer_offload_takes_steps_and_saves(tmp_path):
    """ucf101-3b with zero3_offload on one GPU: optimizer states (and parameters) on the host. Prints the step
    time and the GPU / host memory it took (the figures make gpu-check reports)."""
    shards = tmp_path / "shards"
    make_random_paper_shards(shards, 16)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "nbp_ds.train", "--config", "ucf101-3b", f"data.train={shards}",
           f"train.out_dir={out}", "train.steps=3", "train.micro_batch=4", "train.log_every=1",
           "train.save_every=3", "train.eval_every=0", "deepspeed.config=zero3_offload", "data.num_workers=1",
           "train.activation_checkpointing=true"]
    result = run(cmd, timeout=900, **gpu_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    print(f"3B offload: step {last['perf/step_time']:.2f} s, {last['perf/tokens_per_s']:.0f} tokens/s, "
          f"GPU peak {last['sys/memory_gib']:.1f} GiB")
    assert (out / "checkpoints" / "latest").read_text() == "step00000003"


def make_random_paper_shards(folder, n: int) -> None:
    """Random 5x16x16 tokens of the 64,000-code vocabulary, labels of 101 classes (speed and memory only)."""
    import numpy as np

    from nbp_ds.data import TokenShardWriter

    rng = np.random.default_rng(0)
    with TokenShardWriter(folder, maxcount=8) as writer:
        for i in range(n):
            writer.write(f"s{i:05d}", rng.integers(0, 64000, (5, 16, 16)), int(i % 101), {})
