"""Sharded exports (nbp-export --shard-size): the Hugging Face layout (model-0000k-of-0000n.safetensors, an index
whose weight_map names each tensor's shard, config.json), read back by load_exported, nbp-sample, train.init_from
(real DeepSpeed ZeRO-3 on gloo) and nbp-export itself (converting between the two forms)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from train_helpers import ROOT, make_shards, run

from nbp_ds.config import load_config
from nbp_ds.model import build_model
from nbp_ds.tokenizer import build_tokenizer
from nbp_ds.weights.export import consolidate, load_exported, save_export
from nbp_ds.weights.files import parse_size, plan_shards

SHARD_BYTES = 40_000  # the tiny model's 4-byte weights (~190 KB) in several shards


def nbp_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbp_ds.cli.export", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny model's weights as one file, and that file resharded by nbp-export."""
    tmp = tmp_path_factory.mktemp("shards")
    cfg = load_config("tiny")
    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in build_model(cfg).state_dict().items()}
    single = save_export(state, cfg, tmp / "single.safetensors")
    result = nbp_export(str(single), str(tmp / "sharded"), "--shard-size", f"{SHARD_BYTES}B")
    assert result.returncode == 0, result.stderr[-3000:]
    return state, cfg, single, tmp / "sharded", result.stdout


def test_the_sharded_layout_is_the_hugging_face_one(exported):
    state, cfg, _, sharded, stdout = exported
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    n = len(files)
    assert n >= 3 and f"wrote {n} shards" in stdout
    assert files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert set(index["weight_map"]) == set(state) and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())
    assert json.loads((sharded / "config.json").read_text()) == cfg.to_dict()
    # read as any Hugging Face tool would (plain JSON + safetensors): the same tensors, each in the shard named
    loaded = {}
    for file in files:
        part = load_file(str(sharded / file))
        assert sum(t.numel() * t.element_size() for t in part.values()) <= SHARD_BYTES or len(part) == 1
        assert all(index["weight_map"][name] == file for name in part)
        with safe_open(str(sharded / file), framework="pt") as f:
            assert f.metadata()["format"] == "pt"
        loaded.update(part)
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name


def test_both_forms_load_and_convert_into_each_other(exported, tmp_path):
    state, _, single, sharded, _ = exported
    for where in (sharded, sharded / "model.safetensors.index.json", single):
        model, cfg = load_exported(where)
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, state[name]), (where, name)
    back = tmp_path / "back.safetensors"
    assert nbp_export(str(sharded), str(back)).returncode == 0  # sharded -> one file
    joined, original = load_file(str(back)), load_file(str(single))
    assert joined.keys() == original.keys() and all(torch.equal(joined[k], original[k]) for k in original)
    refused = nbp_export(str(single), str(tmp_path / "out"))  # a folder name without --shard-size
    assert refused.returncode != 0 and "must end in .safetensors (or pass --shard-size" in refused.stderr


def test_sizes_and_the_shard_plan():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1.5 MB") == 1_500_000
    assert parse_size("1000") == 1000
    for bad in ("5XB", "GB", "0GB", "-1GB"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)
    # huggingface_hub's plan: in order, never over the limit; a tensor larger than the limit alone in a shard
    # placed before the one being filled; one shard keeps the numbered name
    sizes = {"a": 4, "b": 4, "c": 30, "d": 2, "e": 8}
    fresh = {name: torch.zeros(size, dtype=torch.uint8) for name, size in sizes.items()}
    flat = torch.zeros(sum(sizes.values()), dtype=torch.uint8)  # a consolidated checkpoint: views of one buffer
    views = dict(zip(sizes, flat.split(list(sizes.values())), strict=True))
    for state in (fresh, views):
        assert plan_shards(state, 10) == {"model-00001-of-00003.safetensors": ["c"],
                                          "model-00002-of-00003.safetensors": ["a", "b", "d"],
                                          "model-00003-of-00003.safetensors": ["e"]}
        assert plan_shards(state, 100) == {"model-00001-of-00001.safetensors": list(sizes)}


def test_nbp_sample_reads_the_sharded_form(tmp_path):
    cfg = load_config("quickstart", ["model.n_layer=1", "model.d_model=32", "model.n_head=2"])
    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in build_model(cfg).state_dict().items()}
    single = save_export(state, cfg, tmp_path / "w.safetensors")
    sharded = save_export(state, cfg, tmp_path / "w_sharded", shard_bytes=100_000).parent
    build_tokenizer("tiny", seed=1).save(tmp_path / "tok")
    tokens = {}
    for name, weights in (("single", single), ("sharded", sharded)):
        out = tmp_path / f"samples_{name}"
        result = subprocess.run([sys.executable, "-m", "nbp_ds.cli.sample", "--device", "cpu", "--weights",
                                 str(weights), "--tokenizer", str(tmp_path / "tok"), "--out", str(out), "--label", "3",
                                 "--no-mp4", "--top-k", "8"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        tokens[name] = np.load(next((out / "tokens").glob("*.npy")))
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    np.testing.assert_array_equal(tokens["sharded"], tokens["single"])  # the same weights: the same video


def test_train_init_from_reads_the_sharded_form(exported, tmp_path):
    state, _, _, sharded, _ = exported
    shards = make_shards(tmp_path / "data", train=32, val=0)[0]
    out = tmp_path / "run"
    # a learning rate so small that one AdamW step leaves the weights where they started (|update| ~ lr)
    result = run([sys.executable, "-m", "nbp_ds.train", "--config", str(sharded / "config.json"),
                  f"train.init_from={sharded}", f"data.train={shards}", f"train.out_dir={out}", "train.steps=1",
                  "train.lr=1.0e-9", "train.warmup_steps=0", "train.save_every=1", "train.eval_every=0",
                  "data.num_workers=0", "deepspeed.config=tests/data/zero3_no_persistence.json"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    after, _ = consolidate(out)
    assert sorted(after) == sorted(state)
    for name, tensor in state.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_a_converted_release_can_be_written_sharded(tmp_path):
    from official_fixtures import write_generator_ckpt

    write_generator_ckpt(tmp_path / "k600.ckpt", "k600")
    single, folder = tmp_path / "k600.safetensors", tmp_path / "k600_sharded"
    convert = [sys.executable, "-m", "nbp_ds.cli.convert_official", "generator", str(tmp_path / "k600.ckpt")]
    assert subprocess.run([*convert, str(single)], cwd=ROOT, capture_output=True, timeout=300).returncode == 0
    result = subprocess.run([*convert, str(folder), "--shard-size", "20kB"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1 and (folder / "config.json").is_file()
    (a, cfg_a), (b, cfg_b) = load_exported(single), load_exported(folder)
    assert cfg_a == cfg_b
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
