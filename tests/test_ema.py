"""The moving average of the weights (train.ema): its update rule, the joining of ZeRO-3 partitions, and a
2-process ZeRO-3 run whose exported average is checked against the raw weights of each step (plus the
offline Weights & Biases log of that run)."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import make_shards, run, train_cmd

from nbp_ds.runtime.ema import WeightsEMA, consolidate


def test_update_rule_starts_from_the_first_weights_and_lerps():
    model = torch.nn.Linear(3, 2)
    ema = WeightsEMA(model, decay=0.75, rank=0)
    seen = []
    for value in (1.0, 5.0, -3.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update()
        seen.append(value)
    # by hand: 1 -> 0.75*1 + 0.25*5 = 2 -> 0.75*2 + 0.25*(-3) = 0.75
    assert torch.allclose(ema.average["weight"], torch.full((2, 3), 0.75))
    assert not WeightsEMA(model, 0.75, rank=1).active  # replicated weights: rank 0 alone keeps the average


def test_partitions_of_every_rank_join_into_the_full_weights(tmp_path):
    full = torch.arange(10, dtype=torch.float32).reshape(2, 5)
    padded = torch.cat([full.reshape(-1), torch.zeros(2)])  # ZeRO-3 pads 10 elements to 12 for 3 ranks
    for rank in range(3):
        state = {"decay": 0.9, "partitioned": True, "rank": rank, "meta": {"w": {"shape": [2, 5], "numel": 10}},
                 "average": {"w": padded[4 * rank: 4 * rank + 4].clone()}}
        torch.save(state, tmp_path / f"ema_rank{rank:05d}.pt")
    assert torch.equal(consolidate(tmp_path)["w"], full)


@pytest.mark.slow
def test_zero3_average_matches_the_raw_weights_of_each_step(tmp_path):
    pytest.importorskip("wandb")
    shards = tmp_path / "shards"
    make_shards(shards, train=80, val=8)
    out = tmp_path / "out"
    result = run(train_cmd(out, shards, "train.steps=3", "train.save_every=1", "train.keep_last=5",
                           "train.eval_every=0", "train.ema=0.75", "train.wandb=true"),
                 WANDB_MODE="offline", WANDB_SILENT="true")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    from nbp_ds.weights.export import consolidate as export_state

    raw = [export_state(out, tag=f"step{s:08d}")[0] for s in (1, 2, 3)]
    average, _ = export_state(out, ema=True)
    assert average.keys() == raw[0].keys()
    for name in raw[0]:  # d = 3/4: w1, then 3/4 w1 + 1/4 w2, then 9/16 w1 + 3/16 w2 + 1/4 w3
        expected = 9 / 16 * raw[0][name] + 3 / 16 * raw[1][name] + 1 / 4 * raw[2][name]
        torch.testing.assert_close(average[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(average["head.weight"], raw[2]["head.weight"])
    # nbp-export --ema writes the average in the export format, which samples like the raw weights' export
    result = run(["python", "-m", "nbp_ds.cli.export", str(out), str(out / "ema.safetensors"), "--ema"])
    assert result.returncode == 0, result.stderr[-3000:]
    from nbp_ds.generate import generate
    from nbp_ds.weights.export import load_exported

    model, _ = load_exported(out / "ema.safetensors")
    exported = model.state_dict()
    assert set(average) <= set(exported)
    for name, value in average.items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=0, msg=name)
    videos, _ = generate(model, 2, label=torch.tensor([0, 1]), temperature=1.0, seed=0)
    assert videos.shape == (2, 3, 4, 4) and int(videos.max()) < 64
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))  # one offline W&B run, holding every logged loss
    assert len(runs) == 1
    data = runs[0].read_bytes()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert b"train/loss" in data and all(json.dumps(row["train/loss"]).encode() in data for row in logged)


def test_an_average_saved_by_three_ranks_loads_into_two(tmp_path):
    """A run resumed on another number of processes: each new rank takes its slice of the joined average."""
    full = torch.arange(10, dtype=torch.float32).reshape(2, 5)
    padded = torch.cat([full.reshape(-1), torch.zeros(2)])
    for rank in range(3):  # saved by 3 ranks: partitions of 4
        torch.save({"decay": 0.9, "partitioned": True, "rank": rank, "meta": {"w": {"shape": [2, 5], "numel": 10}},
                    "average": {"w": padded[4 * rank: 4 * rank + 4].clone()}}, tmp_path / f"ema_rank{rank:05d}.pt")
    for rank in range(2):  # now 2 ranks: partitions of 5, as ZeRO-3 would make them (ds_tensor, ds_shape)
        module = torch.nn.Module()
        module.w = torch.nn.Parameter(torch.empty(0))
        module.w.ds_tensor, module.w.ds_shape, module.w.ds_numel = torch.empty(5), (2, 5), 10
        ema = WeightsEMA(module, 0.9, rank=rank, world=2)
        assert ema.load(tmp_path)
        assert torch.equal(ema.average["w"], full.reshape(-1)[5 * rank: 5 * rank + 5])
