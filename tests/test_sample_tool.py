"""nbp-sample: refuses bad input before any work; writes per-video mp4s, decoded frames, tokens and a record line,
and a preview grid; --restart discards an earlier run; the writer threads hold a bounded number of videos; an
interrupted run (SIGKILL) resumes to exactly what an uninterrupted run gives."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nbp_ds.config import load_config
from nbp_ds.model import build_model
from nbp_ds.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def write_export(path: Path, *overrides: str) -> Path:
    """A file in nbp-export's format, from an untrained model (sampling speed and plumbing only)."""
    cfg = load_config("quickstart", ["model.n_layer=1", "model.d_model=32", "model.n_head=2", *overrides])
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in build_model(cfg).state_dict().items()}
    save_file(state, str(path), metadata={"nbp_ds_config": json.dumps(cfg.to_dict()), "dtype": "fp32"})
    return path


def sample(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbp_ds.cli.sample", "--device", "cpu", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sample")
    build_tokenizer("tiny", seed=1).save(tmp / "tok")
    (tmp / "classes.json").write_text(json.dumps({f"c{i}": i for i in range(12)}))
    # a row per pass from the start (24 passes, not the quickstart's 80): these tests are about the tool, and the
    # quickstart's token-by-token first frame is sampled from the command line by tests/test_long_sampling.py
    return write_export(tmp / "w.safetensors", "layout.hybrid=false", "layout.hybrid_blocks=1"), tmp / "tok", tmp


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "videos.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sampled(assets):
    """Two videos each of classes 0 and 5, in batches of 3: (output folder, the command's result, its arguments)."""
    weights, tok, tmp = assets
    out = tmp / "out"
    args = ["--weights", str(weights), "--tokenizer", str(tok), "--out", str(out), "--label", "0", "--label", "5",
            "--num", "2", "--classes", str(tmp / "classes.json"), "--top-k", "8", "--batch-size", "3"]
    return out, sample(*args), args


def test_samples_every_class(sampled):
    out, result, args = sampled
    assert result.returncode == 0, result.stderr[-3000:]
    stems = ["c0_000", "c0_001", "c5_000", "c5_001"]
    assert sorted(p.name for p in out.glob("*.mp4")) == [f"{s}.mp4" for s in stems]
    rows = sorted(records(out), key=lambda r: r["index"])
    assert [(r["index"], r["stem"], r["label"]) for r in rows] == [(0, "c0_000", 0), (1, "c0_001", 0),
                                                                   (2, "c5_000", 5), (3, "c5_001", 5)]
    for row in rows:
        assert np.load(out / row["tokens"]).shape == (3, 8, 8)
        frames = np.load(out / row["frames"])
        assert frames.shape == (9, 32, 32, 3) and frames.dtype == np.uint8
        assert row["mp4"] == f"{row['stem']}.mp4"
    assert (out / "grid.png").stat().st_size > 0
    assert json.loads((out / "sampling.json").read_text())["labels"] == [0, 5]
    assert "24 forward passes per video" in result.stdout  # 3x8x8 tokens in rows of 8: 24 blocks
    again = sample(*args)
    assert again.returncode == 0 and "4 finished earlier, 0 made now" in again.stdout
    changed = sample(*[("9" if a == "8" else a) for a in args])  # --top-k 9
    assert changed.returncode == 2 and "top_k: 8 -> 9" in changed.stderr


def test_restart_discards_the_earlier_run(sampled, tmp_path):
    """--restart with other settings: the earlier run's videos are gone, the new settings' are made."""
    out, _, args = sampled
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    earlier = {r["stem"]: np.load(copy / r["tokens"]) for r in records(copy)}
    changed = [str(copy) if a == str(out) else a for a in args]
    at = changed.index("--top-k")
    changed[at:at + 2] = ["--temperature", "1.5"]  # instead of --top-k 8
    result = sample(*changed, "--restart")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(4 made now)" in result.stdout and "finished earlier" not in result.stdout
    settings = json.loads((copy / "sampling.json").read_text())
    assert (settings["top_k"], settings["temperature"]) == (None, 1.5)
    rows = records(copy)
    assert sorted(r["stem"] for r in rows) == sorted(earlier)  # one record per video: none kept from before
    assert any(not np.array_equal(np.load(copy / r["tokens"]), earlier[r["stem"]]) for r in rows)


def test_the_writer_holds_at_most_max_pending_videos(tmp_path, monkeypatch):
    """Memory stays bounded while writer threads work: with two videos still being written, the generating side
    waits in submit() before it hands over a third."""
    from nbp_ds.generate.folder import RecordLog, VideoJob, VideoWriter

    for folder in ("frames", "tokens"):
        (tmp_path / folder).mkdir()
    log = RecordLog(tmp_path / "videos.jsonl")
    writer = VideoWriter(tmp_path, log, fps=8.0, mp4=False, workers=4, max_pending=2)
    release, write = threading.Event(), writer._write
    monkeypatch.setattr(writer, "_write", lambda *job: (release.wait(60), write(*job)))  # the disk is stuck
    handed = []

    def generate_videos():
        for i in range(5):
            writer.submit(VideoJob(i, 0, f"v{i}"), np.zeros((3, 8, 8)), np.zeros((9, 32, 32, 3), np.uint8))
            handed.append(i)

    producer = threading.Thread(target=generate_videos)
    producer.start()
    deadline = time.time() + 60
    while len(handed) < 2 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # time for a third hand-over, were it not held back
    assert handed == [0, 1] and producer.is_alive()
    release.set()
    producer.join(60)
    writer.close()
    log.close()
    assert handed == [0, 1, 2, 3, 4] and sorted(r["index"] for r in records(tmp_path)) == [0, 1, 2, 3, 4]


def test_fvd_and_the_class_check_read_the_record(sampled, tmp_path):
    """nbp-eval-fvd takes one input per recorded video (its decoded frames, not the mp4 and the tokens beside
    them); nbp-check-consistency reads the frames with the labels the record gives them."""
    from test_fvd import _save_detector  # the suite's stand-in for StyleGAN-V's I3D detector

    from nbp_ds.eval.synthetic import CLASSES, parse_class, render_clip
    from nbp_ds.generate.folder import RecordLog, VideoJob, VideoWriter

    out = sampled[0]
    i3d = _save_detector(tmp_path / "i3d.pt", 32)
    result = subprocess.run([sys.executable, "-m", "nbp_ds.cli.eval_fvd", "--real", str(out / "frames"), "--fake",
                             str(out), "--i3d", str(i3d), "--num-frames", "8", "--device", "cpu", "--json",
                             str(tmp_path / "fvd.json")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "fvd.json").read_text())
    assert report["num_fake"] == report["num_real"] == 4 and abs(report["fvd"]) < 1e-3  # the same four videos

    # ground-truth clips of the synthetic classes, written by the sampler's writer in a shuffled order
    truth = tmp_path / "truth"
    truth.mkdir()
    log = RecordLog(truth / "videos.jsonl")
    writer = VideoWriter(truth, log, fps=8.0, mp4=False, workers=2, max_pending=4)
    order = np.random.default_rng(0).permutation(len(CLASSES))
    for index, label in enumerate(order.tolist()):
        clip = render_clip(*parse_class(CLASSES[label]), 9, 32, np.random.default_rng([1, label]))
        writer.submit(VideoJob(index, label, f"{CLASSES[label]}_000"), np.zeros((3, 8, 8)), clip)
    writer.close()
    log.close()
    (truth / "classes.json").write_text(json.dumps({name: i for i, name in enumerate(CLASSES)}))
    result = subprocess.run([sys.executable, "-m", "nbp_ds.cli.check_consistency", str(truth), "--json",
                             str(tmp_path / "c.json"), "--min-rate", "0.95"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["count"] == 12 and report["source"].endswith("videos.jsonl")
    assert [r["label"] for r in report["videos"]] == order.tolist()


def test_resumes_after_sigkill_to_the_uninterrupted_output(assets, tmp_path):
    """A run killed midway, then run again, holds exactly the videos of a run never interrupted: each recorded
    once, the ones finished before the kill left alone, every token and frame the same. The runs decode with the
    static decoder, the GPU default's passes (the graph mode replays them); a third run, eager in batches of 3,
    makes each video at another place in another batch: its tokens are the same too."""
    weights, tok, _ = assets
    common = ["--weights", str(weights), "--tokenizer", str(tok), "--label", "1", "--label", "2", "--label", "3",
              "--num", "3", "--temperature", "1.0", "--writers", "1", "--device", "cpu"]
    args = [*common, "--batch-size", "4", "--mode", "static"]
    whole, rebatched = tmp_path / "whole", tmp_path / "rebatched"
    assert sample(*args, "--out", str(whole)).returncode == 0
    assert sample(*common, "--batch-size", "3", "--mode", "eager", "--no-mp4", "--out", str(rebatched)).returncode == 0
    out = tmp_path / "resumed"
    # each video's writing slowed down (tests/faults.py), so the run is surely killed midway
    proc = subprocess.Popen([sys.executable, "tests/faults.py", "sample", "0.4", *args, "--out", str(out)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not ((out / "videos.jsonl").is_file() and len(records(out)) >= 3) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {r["index"]: r for r in records(out)}
    assert 3 <= len(before) < 9  # really interrupted midway
    stamps = {i: [(out / r[k]).stat().st_mtime_ns for k in ("frames", "tokens", "mp4")] for i, r in before.items()}
    result = sample(*args, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{len(before)} finished earlier, {9 - len(before)} made now" in result.stdout
    rows = records(out)
    assert sorted(r["index"] for r in rows) == list(range(9))  # every video once: none made twice
    for i, r in before.items():  # the videos finished before the kill were not touched again
        assert [(out / r[k]).stat().st_mtime_ns for k in ("frames", "tokens", "mp4")] == stamps[i]
    assert not list(out.rglob(".*.tmp*"))  # the killed run's unfinished files are gone
    reference = {r["stem"]: r for r in records(whole)}
    assert sorted(reference) == sorted(r["stem"] for r in rows)
    for r in rows:
        for kind in ("tokens", "frames"):
            assert np.array_equal(np.load(out / r[kind]), np.load(whole / reference[r["stem"]][kind])), (r, kind)
        # (frames only within the same batches: the tokenizer's decoder may round a pixel differently in another)
        assert np.array_equal(np.load(out / r["tokens"]), np.load(rebatched / "tokens" / f"{r['stem']}.npy")), r


def test_refuses_bad_input_before_work(assets, tmp_path):
    weights, tok, _ = assets
    result = sample("--weights", str(weights), "--tokenizer", str(tmp_path / "none"), "--out", str(tmp_path / "o"))
    assert result.returncode != 0 and "--tokenizer" in result.stderr and "none" in result.stderr
    result = sample("--weights", str(weights), "--tokenizer", str(tok), "--out", str(tmp_path / "o"), "--label", "12")
    assert result.returncode != 0 and "--label: labels must be in [0, 12)" in result.stderr
    assert "got [12]" in result.stderr
    other = write_export(tmp_path / "other.safetensors", "model.vocab_size=64")
    result = sample("--weights", str(other), "--tokenizer", str(tok), "--out", str(tmp_path / "o"))
    assert result.returncode != 0 and "has 1000 codes but the model was trained on model.vocab_size=64" in result.stderr
    result = sample("--weights", str(tmp_path / "missing.safetensors"), "--tokenizer", str(tok), "--out", "x")
    assert result.returncode != 0 and "missing.safetensors: no such file" in result.stderr
    assert not (tmp_path / "o").exists()  # nothing was written
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    result = sample("--weights", str(weights), "--tokenizer", str(tok), "--out", str(tmp_path / "busy"))
    assert result.returncode == 2 and "is not empty and holds no sampling.json" in result.stderr
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]


def test_a_packed_model_samples_another_grid_and_refuses_one_it_never_saw(assets, tmp_path):
    """A model trained on packed rows of 400 positions generates a 5x8x8 grid (1 + 320 positions; the layout's is
    3x8x8) and refuses 7x8x8 (449 positions: longer than any clip it saw); a one-grid model refuses any other grid."""
    one_grid, tok, _ = assets
    packed = write_export(tmp_path / "packed.safetensors", "data.pack_tokens=400")
    out = tmp_path / "out"
    common = ["--tokenizer", str(tok), "--label", "1", "--no-mp4"]
    result = sample("--weights", str(packed), "--out", str(out), *common, "--grid", "5,8,8")
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = records(out)
    assert np.load(out / row["tokens"]).shape == (5, 8, 8)
    assert np.load(out / row["frames"]).shape == (17, 32, 32, 3)
    assert json.loads((out / "sampling.json").read_text())["grid"] == [5, 8, 8]
    too_long = sample("--weights", str(packed), "--out", str(tmp_path / "b"), *common, "--grid", "7,8,8")
    assert too_long.returncode == 2 and "takes 449 positions" in too_long.stderr
    assert "never saw one that long" in too_long.stderr
    unseen = sample("--weights", str(one_grid), "--out", str(tmp_path / "c"), *common, "--grid", "5,8,8")
    assert unseen.returncode == 2 and "trained on layout.grid=[3, 8, 8] only" in unseen.stderr
