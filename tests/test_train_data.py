"""The trainer with cluster-scale data, real DeepSpeed ZeRO-3 on CPU: shards over HTTP with a bad URL and a
cut download (training goes on; every rank's problems counted and named by rank 0), and a resume on
another number of processes through DeepSpeed's universal checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from shard_server import ShardServer
from train_helpers import make_shards, run, step_losses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    make_shards(folder, val=0)  # 8 train shards of 40
    return folder


def train_cmd(out_dir: Path, train: str, *overrides: str, nproc: int) -> list[str]:
    return ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "nbp_ds.train", "--config", "tiny", f"data.train={train}", f"train.out_dir={out_dir}",
            "train.log_every=1", "train.eval_every=0", *overrides]


def rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_http_shards_train_past_a_404_and_a_cut_download_and_every_rank_is_counted(shards, tmp_path):
    names = sorted(p.name for p in (shards / "train").glob("*.tar"))
    with ShardServer(shards / "train") as server:
        # rank 1 of 2 reads the odd shards (one loader worker each): both bad ones are its, so its epochs are
        # the few samples before the cut, and it meets both failures in each
        urls = [server.url(names[0]), server.url("gone.tar"), server.url(names[2]), server.url(names[3], cut=20_000)]
        result = run(train_cmd(tmp_path / "out", "::".join(urls), "train.steps=6", "train.save_every=6",
                               "data.retries=1", "data.retry_backoff=0", "data.shuffle_buffer=8", nproc=2))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    last = rows(tmp_path / "out")[-1]
    assert last["step"] == 6 and last["data/samples"] == 6 * 4 * 2 == last["data/source/train"]  # both ranks
    assert last["data/failed_shards"] >= 2 and last["data/shard_retries"] >= 2  # rank 1's, summed into rank 0's log
    summary = result.stderr[result.stderr.index("data problems over all ranks"):]
    assert "gone.tar" in summary and f"{names[3]}?cut=20000" in summary
    # summary.json counts rank 1's failures too (its loader may have met more after the last logged step)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["failed_shards"] >= last["data/failed_shards"]


DUMP_AND_TRAIN = """
import logging, sys, torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from nbp_ds.config import load_config
from nbp_ds.train.loop import Trainer
resume, dump, *overrides = sys.argv[1:]
logging.basicConfig(level=logging.INFO)
trainer = Trainer(load_config("tiny", overrides), resume=resume)  # universal: chosen by the world size
state = {name: [safe_get_full_fp32_param(p), safe_get_full_optimizer_state(p, "exp_avg"),
                safe_get_full_optimizer_state(p, "exp_avg_sq")] for name, p in trainer.engine.module.named_parameters()}
state["weight_decay"] = [g["weight_decay"] for g in trainer.engine.optimizer.param_groups]
if trainer.rank == 0:
    torch.save(state, dump)
trainer.run()
trainer.close()
"""


@pytest.mark.parametrize("before, after, zero", [(2, 1, "zero3"), (1, 2, "zero3"), (2, 1, "zero2")])
def test_resume_on_another_number_of_processes_carries_weights_optimizer_and_data(shards, tmp_path, before, after,
                                                                                  zero):
    # 8 samples a step whatever the number of processes (tiny: 4 per micro-batch): accumulation 2 on one process
    common = ["train.steps=20", "train.save_every=10", "data.num_workers=0", f"deepspeed.config={zero}",
              "train.global_batch=8"]
    first = tmp_path / "first"
    result = run(train_cmd(first, str(shards / "train"), *common, nproc=before))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ckpt = first / "checkpoints" / "step00000010"
    # continued on the other number of processes: converted to a universal checkpoint on its own
    script = tmp_path / "dump_and_train.py"
    script.write_text(DUMP_AND_TRAIN)
    second = tmp_path / "second"
    result = run(["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(after),
                  str(script), str(ckpt), str(tmp_path / "state.pt"), f"data.train={shards / 'train'}",
                  f"train.out_dir={second}", "train.log_every=1", "train.eval_every=0", *common])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert f"through its universal copy (saved by {before} processes, now {after})" in result.stderr
    assert f"continues the interrupted epoch on {after} ranks" in result.stderr
    assert (ckpt / "universal" / "zero").is_dir()
    accum = {1: "2 accumulation steps x 1 process", 2: "1 accumulation step x 2 processes"}
    assert f"global batch 8 samples = micro-batch 4 x {accum[after]}" in result.stderr
    # the same samples per step and the same LR schedule on either side of the resume
    first_rows, second_rows = ({r["step"]: r for r in rows(out) if "train/loss" in r} for out in (first, second))
    for by_step in (first_rows, second_rows):
        assert by_step[20]["data/samples"] - by_step[11]["data/samples"] == 9 * 8
    assert [second_rows[s]["train/lr"] for s in range(11, 21)] == pytest.approx(
        [first_rows[s]["train/lr"] for s in range(11, 21)], rel=1e-12)

    # what the engine holds on the new number of processes is the saved state: the converted files (DeepSpeed's
    # layout, one folder per parameter), whose weights are those zero_to_fp32 reads from the original shards
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    loaded = torch.load(tmp_path / "state.pt", weights_only=False)
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(first / "checkpoints"), tag="step00000010")
    assert loaded.pop("weight_decay") == [0.05, 0.0]  # norm gains are not decayed, as before the resume
    # the LR schedule goes on where it was: step k applies the cosine k - 3 steps past the 2 steps of warmup
    # (tiny: lr 1e-3 down to 10% over 18 steps), as the logged train/lr (the rate each step applied) shows
    applied = {r["step"]: r["train/lr"] for r in rows(second)}
    assert applied == pytest.approx({k: 1e-3 * (0.1 + 0.9 * (1 + math.cos(math.pi * (k - 3) / 18)) / 2)
                                     for k in range(11, 21)}, rel=1e-9)
    assert set(loaded) == set(consolidated)
    for name, (fp32, exp_avg, exp_avg_sq) in loaded.items():
        torch.testing.assert_close(fp32, consolidated[name], rtol=0, atol=0)
        for value, key in ((fp32, "fp32"), (exp_avg, "exp_avg"), (exp_avg_sq, "exp_avg_sq")):
            converted = torch.load(ckpt / "universal" / "zero" / name / f"{key}.pt", weights_only=False)
            converted = converted["param"] if isinstance(converted, dict) else converted  # ZeRO-2 | ZeRO-3 (flat)
            torch.testing.assert_close(value, converted.reshape(value.shape), rtol=0, atol=0)
        assert exp_avg_sq.abs().sum() > 0  # ten steps of moments, not a fresh optimizer
    # the loss goes on from where it was (other processes, other random streams: not the same numbers), far from its
    # start
    a, b = step_losses(first), step_losses(second)
    assert sorted(b) == list(range(11, 21))
    start, at_save = a[1], sum(a[s] for s in (8, 9, 10)) / 3
    after_resume = sum(b[s] for s in (11, 12, 13)) / 3
    assert after_resume < (start + at_save) / 2 and abs(after_resume - at_save) < 0.3, (start, at_save, b)
    assert abs(b[20] - a[20]) < 0.4, (a, b)
