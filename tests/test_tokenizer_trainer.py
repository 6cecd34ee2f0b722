"""Tokenizer training (nbp-train-tokenizer) end to end on real videos: the run folder's contents, a clean
refusal of a bad preset, and an exact resume from the checkpoint manager's latest checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_tokenize_pipeline import processes_mentioning
from test_tokenizer_losses import write_vgg16_file
from video_fixtures import dataset, lavfi_video

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def train(videos: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nbp_ds.cli.train_tokenizer", "--videos", str(videos), "--out", str(out),
           "--preset", "tiny", "--frames", "9", "--resolution", "32", "--batch-size", "2", "--workers", "2",
           "--log-every", "1", "--image-every", "1000", "--warmup", "1", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})


def test_trains_writes_its_outputs_and_resumes_exactly(tmp_path):
    videos = dataset(tmp_path / "videos", classes=2, per_class=3)
    out = tmp_path / "run"
    first = train(videos, out, "--steps", "4", "--save-every", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == "step00000004"
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 4 and report["val_psnr"] > 0 and report["preset"] == "tiny"
    assert 0 < report["val_ssim"] <= 1
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and list((out / "tb").glob("events.out.tfevents.*"))
    straight = load_file(out / "tokenizer" / "tokenizer.safetensors")
    skipped = json.loads((out / "skipped_videos" / "rank00000.json").read_text())
    assert sorted(Path(f["video"]).name for f in skipped) == ["broken.mp4", "short.mp4"]
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["data/skipped_videos"] == 2

    # as if the run had died after step 2's checkpoint: resuming (weights, optimizer, and the clip stream where
    # it stopped) must give the very same weights
    shutil.rmtree(out / "checkpoints" / "step00000004")
    shutil.rmtree(out / "tokenizer")
    (out / "checkpoints" / "latest").write_text("step00000002")
    again = train(videos, out, "--steps", "4", "--save-every", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "step00000002" in again.stderr
    resumed = load_file(out / "tokenizer" / "tokenizer.safetensors")
    assert resumed.keys() == straight.keys()
    assert all((resumed[k] == straight[k]).all() for k in straight), "resumed weights differ from the straight run"

    bad = train(videos, tmp_path / "other", "--preset", "huge", "--steps", "1")
    assert bad.returncode == 2 and "--preset 'huge'" in bad.stderr
    wrong = train(videos, out, "--preset", "small", "--steps", "5")  # the run folder holds a 'tiny' tokenizer
    assert wrong.returncode == 2 and "'tiny' tokenizer, not --preset small" in wrong.stderr


def test_recipe_perceptual_gan_lecam_adaptive_weight_trains_and_keeps_its_state(tmp_path):
    videos = dataset(tmp_path / "videos", classes=2, per_class=3)
    out = tmp_path / "gan"
    vgg = write_vgg16_file(tmp_path / "vgg16.pth")
    result = train(videos, out, "--steps", "2", "--save-every", "2", "--adversarial-weight", "0.1",
                   "--adversarial-start", "0", "loss.lecam_weight=0.001", "loss.lecam_decay=0.5",
                   "loss.perceptual_weight=0.1", f"loss.perceptual_file={vgg}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(row["train/perceptual"] > 0 for row in rows)
    assert all(row["gan/g_weight"] > 0 and row["gan/g_weight"] != 0.1 for row in rows)  # adapted, not the base
    saved = out / "checkpoints" / "step00000002"
    lecam = json.loads((saved / "rank00000_lecam.json").read_text())
    assert lecam["decay"] == 0.5 and lecam["real"] is not None
    assert torch.load(saved / "discriminator.pt", weights_only=False)["optimizer"]["state"]


def test_ema_weights_are_the_saved_tokenizer(tmp_path):
    videos = dataset(tmp_path / "videos", classes=2, per_class=3)
    out = tmp_path / "ema"
    result = train(videos, out, "--steps", "2", "--save-every", "1", "train.ema=0.25")
    assert result.returncode == 0, result.stderr[-3000:]
    # the average copies the weights after step 1, then ema = 0.25 * w1 + 0.75 * w2
    w1, w2 = (torch.load(out / "checkpoints" / f"step0000000{s}" / "state.pt", weights_only=False)["model"]
              for s in (1, 2))
    saved = load_file(out / "tokenizer" / "tokenizer.safetensors")
    params = {k for k in w2 if "weight" in k or "bias" in k}
    assert params and any(not torch.equal(w1[k], w2[k]) for k in params)
    for k in params:
        torch.testing.assert_close(saved[k], 0.25 * w1[k] + 0.75 * w2[k], rtol=1e-5, atol=1e-6)


def test_report_gives_the_reconstruction_fvd_with_an_i3d_file(tmp_path):
    import numpy as np
    from test_fvd import _save_detector

    from nbp_ds.eval.fvd import I3DFeatureExtractor, compute_fvd
    from nbp_ds.tokenizer import load_tokenizer

    videos = dataset(tmp_path / "videos", classes=2, per_class=3)
    out = tmp_path / "fvd"
    detector = _save_detector(tmp_path / "i3d.pt", 32)  # a small TorchScript stand-in with the detector's call
    result = train(videos, out, "--steps", "1", "--val-videos", str(videos), f"train.i3d={detector}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    # the same figure from the saved tokenizer's codes and nbp-eval-fvd's code
    clips = np.load(out / "clips_val.npy")
    recon = load_tokenizer(out).decode(load_tokenizer(out).encode(torch.from_numpy(clips))).numpy()
    expected = compute_fvd(clips, recon, I3DFeatureExtractor(detector, num_frames=9))
    assert report["val_rfvd"] == pytest.approx(expected, rel=1e-6) and report["val_rfvd"] > 0


def test_a_resume_with_the_gan_on_gives_the_weights_of_a_straight_run(tmp_path):
    """The whole recipe's state through a resume: the GAN joins after a warm-up (adversarial_start 0.25 of 4 steps:
    from the second step), the checkpoint of step 2 holds a discriminator one step trained, its optimizer and the
    LeCAM averages; resuming from it must end with the straight run's tokenizer and discriminator."""
    videos = dataset(tmp_path / "videos", classes=2, per_class=3)
    out = tmp_path / "gan"
    recipe = ("--steps", "4", "--save-every", "2", "--adversarial-weight", "0.1", "--adversarial-start", "0.25",
              "loss.lecam_weight=0.1", "loss.lecam_decay=0.5")
    first = train(videos, out, *recipe)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = {row["step"]: row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert "gan/d" not in rows[1] and all("gan/d" in rows[s] for s in (2, 3, 4))  # the warm-up, then the GAN
    straight = load_file(out / "tokenizer" / "tokenizer.safetensors")
    straight_disc = torch.load(out / "checkpoints" / "step00000004" / "discriminator.pt", weights_only=False)

    shutil.rmtree(out / "checkpoints" / "step00000004")  # as if the run had died after step 2's checkpoint
    shutil.rmtree(out / "tokenizer")
    (out / "checkpoints" / "latest").write_text("step00000002")
    again = train(videos, out, *recipe)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "step00000002" in again.stderr
    resumed = load_file(out / "tokenizer" / "tokenizer.safetensors")
    resumed_disc = torch.load(out / "checkpoints" / "step00000004" / "discriminator.pt", weights_only=False)
    assert [k for k in straight if not torch.equal(resumed[k], straight[k])] == [], "the tokenizer differs"
    disc, disc_again = straight_disc["model"], resumed_disc["model"]
    assert [k for k in disc if not torch.equal(disc_again[k], disc[k])] == [], "the discriminator differs"


def test_a_held_out_video_whose_decoder_dies_or_hangs_is_listed_and_training_goes_on(tmp_path):
    """Two held-out "videos" are named pipes, whose reads never return (a file on a hung network file system):
    the decoding worker of crash.mp4 is killed by this test (as a decoder crash or the OOM killer would), stuck.mp4
    runs past data.val_video_timeout. Both are listed with their reason, their processes are gone, the held-out
    clips are the good video's, and the run trains to the end."""
    import os
    import signal
    import threading
    import time

    import numpy as np

    from nbp_ds.video_io import ClipSpec

    videos = dataset(tmp_path / "videos", classes=2, per_class=3)
    val = tmp_path / "val"
    good = lavfi_video(val / "good.mp4", source="testsrc2")
    crash, stuck = val / "crash.mp4", val / "stuck.mp4"
    os.mkfifo(crash)
    os.mkfifo(stuck)
    killed: list[int] = []

    def kill_the_worker_decoding_crash():  # the worker leads a process group holding its ffmpeg
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            for pid in processes_mentioning(str(crash)):
                try:
                    worker = os.getpgid(pid)
                    if worker != os.getpgid(0):
                        os.kill(worker, signal.SIGKILL)
                        killed.append(worker)
                        break
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    killer = threading.Thread(target=kill_the_worker_decoding_crash)
    killer.start()
    out = tmp_path / "run"
    result = train(videos, out, "--steps", "2", "--val-videos", str(val), "data.val_video_timeout=12")
    killer.join()
    assert result.returncode == 0, result.stderr[-3000:]
    assert killed, "no decoder of crash.mp4 was ever seen"
    skipped = {Path(r["video"]).name: r["reason"]
               for r in json.loads((out / "skipped_videos" / "rank00000.json").read_text())}
    assert skipped["crash.mp4"].startswith("worker_died") and "SIGKILL" in skipped["crash.mp4"], skipped
    assert skipped["stuck.mp4"].startswith("timeout") and "12 s" in skipped["stuck.mp4"], skipped
    clip = ClipSpec(9, 32, 8.0, 1).read(good)[0][1]  # the good video's one held-out clip, decoded here
    held_out = np.load(out / "clips_val.npy")
    assert held_out.shape == (1, *clip.shape) and np.array_equal(held_out[0], clip)
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2 and report["val_clips"] == 1
    # the report's codebook use: the share of the codes the saved tokenizer gives the held-out clip
    from nbp_ds.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(out)
    codes = tokenizer.encode(torch.from_numpy(held_out))
    assert report["val_codebook_used"] == codes.unique().numel() / tokenizer.codebook_size
    assert processes_mentioning(str(crash)) == [] and processes_mentioning(str(stuck)) == []


def test_trains_from_shards_of_raw_videos_and_lists_their_bad_members(tmp_path):
    import webdataset as wds

    videos = dataset(tmp_path / "videos", classes=2, per_class=3)
    shards = tmp_path / "shards"
    shards.mkdir()
    for c in (0, 1):  # one shard per class: the broken file in the first, the too-short video in the second
        with wds.TarWriter(str(shards / f"shard-{c:06d}.tar")) as sink:
            for video in sorted((videos / f"class{c}").glob("*.mp4")):
                sink.write({"__key__": video.stem, "mp4": video.read_bytes(), "cls": str(c).encode()})
    out = tmp_path / "run"
    refused = train(f"{shards}/shard-{{000000..000001}}.tar", out, "--steps", "2")
    assert refused.returncode == 2 and "data.val_videos (--val-videos) is required" in refused.stderr
    run = train(f"{shards}/shard-{{000000..000001}}.tar", out, "--steps", "3", "--val-videos", str(videos / "class1"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["train_shards"] == 2
    skipped = {f["video"] for f in json.loads((out / "skipped_videos" / "rank00000.json").read_text())}
    assert {f"{shards}/shard-000000.tar#broken", f"{shards}/shard-000001.tar#short"} <= skipped
    positions = json.loads(next((out / "checkpoints" / "step00000003").glob("rank00000*.json")).read_text())
    assert all(len(p) == 4 for p in positions["positions"])  # (epoch, shard, member, clips taken)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["data/failed_shards"] == 0 and last["data/skipped_videos"] >= 2
