"""The trainer with real DeepSpeed ZeRO-3 on CPU: two processes, gloo."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import (
    GRID,
    env,
    kill_group,
    make_shards,
    run,
    signal_workers,
    start,
    step_counts,
    step_losses,
    train_cmd,
    wait_for,
    wait_for_latest,
    with_shutdown_probe,
)

from nbp_ds.data import TokenShardWriter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    make_shards(folder)
    return folder


@pytest.fixture(scope="module")
def trained_launch(shards, tmp_path_factory):
    """One 40-step ZeRO-3 run shared by the assertions that only read its outputs, with the shutdown probe of
    tests/data/shutdown_probe: (its output folder, the launch's result)."""
    out = tmp_path_factory.mktemp("run") / "out"
    result = run(train_cmd(out, shards, "train.steps=40", "train.save_every=20", "train.eval_every=20",
                           "train.sample_every=20", "train.sample_tokenizer=random:tiny", "train.profile=[2,3]",
                           "data.num_workers=1",  # a loader worker per rank, started from the fork server
                           "deepspeed.config=tests/data/zero3_no_persistence.json"), **with_shutdown_probe())
    return out, result


@pytest.fixture(scope="module")
def trained(trained_launch):
    out, result = trained_launch
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_zero3_learns_and_logs(trained):
    losses = step_losses(trained)
    assert sorted(losses) == list(range(1, 41))
    first, last = sum(losses[s] for s in range(1, 4)) / 3, sum(losses[s] for s in range(38, 41)) / 3
    assert last < first - 0.5, (first, last)
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    assert len(val) == 2 and val[1] < val[0]
    assert {"train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/step_time", "perf/data_wait",
            "sys/memory_gib", "data/samples"} <= set(rows[0])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (trained / "tb").glob("events.out.tfevents.*")
    board = EventAccumulator(str(events), size_guidance={"images": 0})
    board.Reload()
    # train.sample_every: a video per class (tiny: 4) and the grid of them all, at steps 20 and 40
    samples = [tag for tag in board.Tags()["images"] if tag.startswith("samples/")]
    assert "samples/grid" in samples and len(samples) == 5
    assert all([e.step for e in board.Images(tag)] == [20, 40] for tag in samples)
    scalars = set(board.Tags()["scalars"])
    assert {"train/loss", "val/loss", "perf/tokens_per_s", "data/samples", "sys/memory_gib"} <= scalars
    assert (trained / "checkpoints" / "latest").read_text() == "step00000040"


def test_the_run_summary_counts_what_was_trained(trained):
    summary = json.loads((trained / "summary.json").read_text())
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    # tiny: 4 samples per rank x 2 ranks a step; a sample is 49 positions (class token, a 16-token BOV block,
    # then the 3x4x4 video's blocks but the last)
    assert {k: summary[k] for k in ("status", "steps", "samples", "tokens", "restarts", "skipped_steps",
                                    "failed_shards")} == {"status": "finished", "steps": 40, "samples": 320,
                                                          "tokens": 320 * 49, "restarts": 0, "skipped_steps": 0,
                                                          "failed_shards": 0}
    assert (summary["final_val_loss"], summary["best_val_loss"]) == (val[-1], min(val))
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["wall_time_s"], rel=1e-3)
    assert summary["mfu"] is None  # no peak FLOP/s on the CPU


def test_the_profile_window_is_traced_on_rank_0_only(trained):
    (trace,) = (trained / "profile").glob("*.pt.trace.json")
    assert trace.name.startswith("rank0.")
    events = json.loads(trace.read_text())["traceEvents"]  # a Chrome trace: Perfetto, TensorBoard's profiler
    assert sorted(e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")) == [
        "ProfilerStep#2", "ProfilerStep#3"]
    assert any(e.get("name") == "aten::scaled_dot_product_attention" for e in events)  # the model's work is in it


def test_parameters_are_sharded(trained):
    ranks = json.loads((trained / "sharding.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["zero_stage"] == 3 for r in ranks)
    total = ranks[0]["params_total"]
    for r in ranks:
        assert abs(r["params_local"] - total / 2) <= 0.02 * total, r


def test_export_loads_and_matches_the_engine(trained, tmp_path):
    from nbp_ds.weights.export import load_exported

    result = run(["python", "-m", "nbp_ds.cli.export", str(trained), str(tmp_path / "w.safetensors")])
    assert result.returncode == 0, result.stderr[-2000:]
    model, cfg = load_exported(tmp_path / "w.safetensors")
    in_memory, _ = load_exported(trained)  # a checkpoint folder, consolidated without export
    g = torch.Generator().manual_seed(0)
    batch = {"tokens": torch.randint(0, 64, (3, *cfg.layout.grid), generator=g), "label": torch.tensor([0, 1, 2])}
    with torch.no_grad():
        exported = model.logits(batch)
        torch.testing.assert_close(in_memory.logits(batch), exported)
    # the engine's own logits, computed inside a 2-process ZeRO-3 job from the same checkpoint
    torch.save(batch, tmp_path / "batch.pt")
    script = tmp_path / "engine_logits.py"
    script.write_text(ENGINE_LOGITS.format(out=trained, batch=tmp_path / "batch.pt", dump=tmp_path / "engine.pt"))
    result = run(["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "engine.pt"), exported, rtol=1e-5, atol=1e-5)


ENGINE_LOGITS = """
import json, torch, torch.distributed as dist
from nbp_ds.config import RunConfig
from nbp_ds.train.loop import Trainer
cfg = RunConfig.from_dict(json.load(open("{out}/config.json")))
trainer = Trainer(cfg)  # resumes from the run's latest checkpoint
trainer.engine.eval()
with torch.no_grad():
    logits = trainer.engine.module.logits(torch.load("{batch}"))
if dist.get_rank() == 0:
    torch.save(logits, "{dump}")
trainer.close()
"""


def test_exact_resume_after_sigkill(shards, tmp_path):
    steps = ["train.steps=24", "train.save_every=12", "train.eval_every=12", "data.num_workers=2"]
    straight = tmp_path / "straight"
    result = run(train_cmd(straight, shards, *steps))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    interrupted = tmp_path / "interrupted"
    proc = start(train_cmd(interrupted, shards, *steps), tmp_path / "first.log", faults={"step_sleep": 0.15})
    wait_for_latest(interrupted, "step00000012", proc)
    kill_group(proc, signal.SIGKILL)
    proc.wait(timeout=60)
    # killed after step 12's checkpoint and before step 24's completed (training itself may have run on)
    assert (interrupted / "checkpoints" / "latest").read_text() == "step00000012"
    result = run(train_cmd(interrupted, shards, *steps))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "resumed from" in result.stderr + result.stdout
    assert "data stream continues at batch 12 of this rank (seeks" in result.stderr  # the saved state, no replay
    a, b = step_losses(straight), step_losses(interrupted)
    assert [b[s] for s in range(13, 25)] == [a[s] for s in range(13, 25)]
    # summary.json of the requeued run: the straight run's, but for the figures of time and the restart
    from nbp_ds.runtime.summary import TIME_AND_STARTS

    first, second = (json.loads((out / "summary.json").read_text()) for out in (straight, interrupted))
    assert (first["restarts"], second["restarts"]) == (0, 1) and first["best_val_loss"] is not None
    assert {k: v for k, v in first.items() if k not in TIME_AND_STARTS} == {
        k: v for k, v in second.items() if k not in TIME_AND_STARTS}
    assert "run summary" in result.stderr


def test_sigterm_saves_exits_zero_and_resumes(shards, tmp_path):
    out = tmp_path / "out"
    steps = ["train.steps=30", "train.save_every=100", "train.eval_every=0"]
    proc = start(train_cmd(out, shards, *steps), tmp_path / "log", faults={"step_sleep": 0.2})
    while not (out / "metrics.jsonl").is_file() or len(step_losses(out)) < 5:
        assert proc.poll() is None, (tmp_path / "log").read_text()[-3000:]
    assert signal_workers(proc, signal.SIGTERM) == 2
    assert proc.wait(timeout=120) == 0, (tmp_path / "log").read_text()[-3000:]
    stopped_at = int((out / "checkpoints" / "latest").read_text()[4:])
    assert 5 <= stopped_at < 30
    result = run(train_cmd(out, shards, *steps))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    counts = step_counts(out)
    assert sorted(counts) == list(range(1, 31)) and set(counts.values()) == {1}  # no step trained twice


def test_save_killed_halfway_keeps_previous_latest(shards, tmp_path):
    out = tmp_path / "out"
    steps = ["train.steps=20", "train.save_every=5", "train.eval_every=0"]
    proc = start(train_cmd(out, shards, *steps), tmp_path / "log")
    wait_for_latest(out, "step00000005", proc)
    kill_group(proc, signal.SIGKILL)
    proc.wait(timeout=60)
    # the next save stops on every rank after writing its part and before 'latest' moves; kill it there
    marker = tmp_path / "stalled"
    proc = start(train_cmd(out, shards, *steps), tmp_path / "log2",
                 faults={"stall_ranks": "all", "stall_at": "step00000010", "stall_marker": str(marker)})
    wait_for(lambda: all(Path(f"{marker}.rank{r}").exists() for r in (0, 1)), proc, "both ranks stalled")
    assert list((out / "checkpoints").glob("step00000010/*optim_states.pt"))  # the shards are really written
    kill_group(proc, signal.SIGKILL)
    proc.wait(timeout=60)
    assert (out / "checkpoints" / "latest").read_text() == "step00000005"
    result = run(train_cmd(out, shards, *steps))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "resumed from" in result.stderr and "step00000005" in result.stderr


def test_latest_moves_only_after_every_rank_has_written(shards, tmp_path):
    """Rank 1 stalls after writing its part of step 10's checkpoint; rank 0 finishes its part and must wait at
    the barrier: while rank 1 is stalled, 'latest' still names step 5. Released, the run ends at step 10."""
    out, marker, release = tmp_path / "out", tmp_path / "stalled", tmp_path / "release"
    proc = start(train_cmd(out, shards, "train.steps=10", "train.save_every=5", "train.eval_every=0"),
                 tmp_path / "log", faults={"stall_ranks": [1], "stall_at": "step00000010",
                                           "stall_marker": str(marker), "release_file": str(release)})
    rank0_done = out / "checkpoints" / "step00000010" / "rank00000_rng.pt"  # rank 0's last file of the save
    wait_for(lambda: Path(f"{marker}.rank1").exists() and rank0_done.exists(), proc, "rank 1 stalled")
    time.sleep(2.0)  # ample time for rank 0 to move 'latest', were it not waiting for rank 1
    assert (out / "checkpoints" / "latest").read_text() == "step00000005"
    release.touch()
    assert proc.wait(timeout=120) == 0, (tmp_path / "log").read_text()[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == "step00000010"


def test_figures_summed_over_ranks_and_the_applied_lr_match_hand_counts(tmp_path):
    """Two ranks of unequal data, 6 steps of 2 micro-batches of 4. Training: rank 0 reads a shard of 40 good
    samples, rank 1 a shard of one corrupt member, one of the wrong shape and one good sample, read in stored
    order (a shuffle buffer of one), so rank 1 skips one of each before each good sample. Validation: shards of
    40, 40 and 8 samples, rank 0 reads 48 and rank 1 40; val/loss is the mean over all 88, computed here from
    the exported weights in one process. The learning rate each step applies is read from the optimizer
    (tests/readback.py) and compared with warmup + cosine + floor written out here."""
    from test_data_loader import corrupt_shard

    shards = tmp_path / "shards"
    make_shards(shards, train=40, val=0)  # train/shard-000000.tar: rank 0's
    corrupt_shard(shards / "train" / "shard-000001.tar", GRID)  # rank 1's
    rng = np.random.default_rng(5)
    with TokenShardWriter(shards / "val", maxcount=40) as writer:
        for i in range(88):
            writer.write(f"v{i:04d}", rng.integers(0, 64, GRID), i % 4, {})
    out, lrs = tmp_path / "out", tmp_path / "lrs.json"
    steps, accum, micro, ranks, peak, warmup, floor = 6, 2, 4, 2, 1e-3, 2, 0.1
    result = run(["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                  "tests/readback.py", str(lrs), f"data.train={shards / 'train'}", f"data.val={shards / 'val'}",
                  f"train.out_dir={out}", "train.log_every=1", f"train.steps={steps}", f"train.grad_accum={accum}",
                  f"train.micro_batch={micro}", f"train.lr={peak}", f"train.warmup_steps={warmup}",
                  f"train.min_lr_ratio={floor}", f"train.eval_every={steps}", f"train.save_every={steps}",
                  "data.val_batches=0", "data.shuffle_buffer=1", "data.num_workers=1"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r}
    assert sorted(rows) == list(range(1, steps + 1))

    # data counters, summed over both ranks: every micro-batch of both is 4 good samples; only rank 1 skips
    for step, row in rows.items():
        good = step * accum * micro * ranks
        assert (row["data/samples"], row["data/source/train"], row["data/batches"]) == (good, good, good // micro)
        assert row["data/corrupt"] == row["data/bad_shape"] == step * accum * micro  # rank 1's skips
        assert row["data/failed_shards"] == row["data/shard_retries"] == 0
        # tokens/s: every rank's sequences (class token + BOV block + 11 blocks of 4 = 49 positions) per second
        assert row["perf/tokens_per_s"] * row["perf/step_time"] == pytest.approx(ranks * accum * micro * 49)
        assert row["perf/tokens_per_s_per_device"] == pytest.approx(row["perf/tokens_per_s"] / ranks)

    # the learning rate: linear warmup over 2 steps, then half a cosine from the peak to peak * floor over the
    # other 4, read before each step's updates; after the last step the optimizer holds the floor
    def expected(step: int) -> float:
        if step <= warmup:
            return peak * step / warmup
        progress = (step - 1 - warmup) / (steps - warmup)
        return peak * (floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2)

    read = json.loads(lrs.read_text())
    applied = {int(step): group_lrs for step, group_lrs in read["applied"].items()}
    assert sorted(applied) == list(range(1, steps + 1))
    for step, group_lrs in applied.items():
        assert group_lrs == pytest.approx([expected(step)] * 2, rel=1e-9), step  # decayed and not decayed groups
        assert rows[step]["train/lr"] == pytest.approx(expected(step), rel=1e-9), step  # the figure logged
    assert [applied[s][0] / peak for s in (1, 2, 3, 5)] == pytest.approx([0.5, 1.0, 1.0, 0.55])
    assert read["after_last"] == pytest.approx([peak * floor] * 2, rel=1e-9)

    # validation: every sample once, whatever rank read it
    logged = [json.loads(line)["val/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "val/loss" in line]
    from nbp_ds.data import build_loader
    from nbp_ds.weights.export import load_exported

    model, cfg = load_exported(out)
    losses = []
    with torch.no_grad():
        for batch in build_loader(shards / "val", grid=GRID, batch_size=8, mode="val", num_workers=0):
            losses += [model.loss({"tokens": t[None], "label": y[None]})[0].item()
                       for t, y in zip(batch["tokens"], batch["label"], strict=True)]
    assert len(losses) == 88  # every sample has the same number of targets: the mean of per-sample losses
    assert logged == [pytest.approx(sum(losses) / len(losses), rel=1e-5)]


def test_nan_steps_are_skipped_then_the_run_stops(shards, tmp_path):
    result = run(train_cmd(tmp_path / "a", shards, "train.steps=8", "train.eval_every=0", "train.save_every=0"),
                 faults={"nan_steps": [3]})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "the update was skipped (1 in a row" in result.stderr
    result = run(train_cmd(tmp_path / "b", shards, "train.steps=10", "train.eval_every=0", "train.max_bad_steps=3"),
                 faults={"nan_steps": [3, 4, 5]})
    assert result.returncode != 0
    assert "3 steps in a row had a non-finite loss" in result.stderr


def test_bad_input_is_refused_before_work(trained, shards, tmp_path):
    """One process, no launcher: each problem is named and the exit status is 2."""
    base = [sys.executable, "-m", "nbp_ds.train", "--config", "tiny", f"data.train={shards / 'train'}",
            f"train.out_dir={tmp_path / 'x'}"]
    result = run([*base, "train.stepz=3"])
    assert result.returncode == 2 and "train.stepz" in result.stderr
    result = run([*base, f"data.train={tmp_path / 'nowhere'}"])
    assert result.returncode == 2 and "nowhere" in result.stderr
    result = run([*base, "--resume", str(trained), "model.d_model=128"])
    assert result.returncode == 2 and "trained for another model or sequence" in result.stderr
    assert "model.d_model: 64 -> 128" in result.stderr


def test_deepspeeds_own_zero_to_fp32_script_rebuilds_the_exported_weights(trained, tmp_path):
    """DeepSpeed writes zero_to_fp32.py beside the checkpoints; run as DeepSpeed documents (`python zero_to_fp32.py
    . OUT [--safe_serialization] [--max_shard_size]` in that folder) it needs huggingface_hub, a dependency of the
    package (issue 36). Its weights are nbp-export's bit for bit, and sharded at the same size its files and
    weight map are nbp-export's too (both plan with huggingface_hub)."""
    from safetensors.torch import load_file

    checkpoints = trained / "checkpoints"
    script = checkpoints / "zero_to_fp32.py"
    assert script.is_file()
    exported = tmp_path / "export"
    result = run(["python", "-m", "nbp_ds.cli.export", str(trained), str(exported), "--shard-size", "100KB"])
    assert result.returncode == 0, result.stderr[-2000:]

    for how, args in (("pytorch", []), ("sharded", ["--safe_serialization", "--max_shard_size", "100KB"])):
        out = tmp_path / how.replace(" ", "_")
        result = subprocess.run([sys.executable, script.name, ".", str(out), *args], cwd=checkpoints,
                                env=env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{how}: {result.stderr[-3000:]}"
        if how == "pytorch":
            theirs = torch.load(out / "pytorch_model.bin", weights_only=True)
        else:
            index = json.loads((out / "model.safetensors.index.json").read_text())
            ours = json.loads((exported / "model.safetensors.index.json").read_text())
            assert len(set(ours["weight_map"].values())) > 2  # several shards to tell the plans apart
            assert index["weight_map"] == ours["weight_map"]
            assert sorted(p.name for p in out.glob("model-*")) == sorted(p.name for p in exported.glob("model-*"))
            theirs = {k: v for f in out.glob("model-*.safetensors") for k, v in load_file(f).items()}
        mine = {k: v for f in exported.glob("model-*.safetensors") for k, v in load_file(f).items()}
        assert theirs.keys() == mine.keys(), how
        assert [k for k in mine if not torch.equal(theirs[k].float(), mine[k])] == [], how


def test_cpu_training_builds_no_deepspeed_op(trained_launch):
    """DeepSpeed's communication layer would compile (or load) its shared-memory all-reduce on every CPU run, which
    ZeRO training never calls: nbp_ds.train.engine marks it as not buildable, so the run names no such op."""
    _, result = trained_launch
    assert result.returncode == 0, result.stderr[-3000:]
    assert "deepspeed_shm_comm" not in result.stdout + result.stderr, result.stdout[-3000:]


def test_a_finished_run_ends_every_rank_with_0_before_the_interpreters_shutdown(trained_launch):
    """Issue 36: a finished 2-process run exits 0 every time. Each rank of a finished job ends as soon as it has
    left the process group (nbp_ds.runtime.distributed.end_launched_process), never in the interpreter's shutdown
    with gloo's threads alive, where a rank aborted now and then; the probe fails a rank that gets there."""
    _, result = trained_launch
    assert "the interpreter's shutdown began with gloo's threads running" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finished 40 steps" in result.stderr
    # the loader workers' queues were closed before the rank's os._exit, or the resource tracker names the rest
    assert "leaked semaphore" not in result.stderr, result.stderr[-3000:]
