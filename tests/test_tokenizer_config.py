"""The tokenizer trainer's config: YAML presets, key=value overrides, its flags as spellings of config keys with
the dataclass as the one source of defaults, --print-config, refusals naming the key."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from video_fixtures import dataset

from nbp_ds.cli.train_tokenizer import build_parser, config_from_arguments
from nbp_ds.config import ConfigError
from nbp_ds.tokenizer.config import FLAGS, TOKENIZER_CONFIG_DIR, TokenizerTrainConfig, load_tokenizer_config
from nbp_ds.tokenizer.trainer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ["data.videos=v", "train.out_dir=o"]


def test_flags_and_overrides_set_the_same_keys():
    by_flags, _ = config_from_arguments(["--videos", "v", "--out", "o", "--steps", "7", "--frames", "9",
                                         "--fps", "4", "--workers", "3", "--adversarial-weight", "0.25"])
    by_keys = load_tokenizer_config(None, REQUIRED + ["train.steps=7", "data.clip.frames=9", "data.clip.fps=4",
                                                      "data.workers=3", "loss.adversarial_weight=0.25"])
    assert by_flags == by_keys
    assert by_flags.train.steps == 7 and by_flags.data.clip.fps == 4.0 and by_flags.loss.adversarial_weight == 0.25
    # overrides come after the flags, whatever their place on the line
    late, _ = config_from_arguments(["train.steps=9", "--videos", "v", "--out", "o", "--steps", "7"])
    assert late.train.steps == 9


def test_the_dataclass_is_the_only_source_of_defaults():
    parser = build_parser()
    assert all(action.default is argparse.SUPPRESS for action in parser._actions if action.dest in
               {key for _, key, _, _ in FLAGS})
    defaults = load_tokenizer_config(None, REQUIRED)
    expected = TokenizerTrainConfig()
    expected.data.videos, expected.train.out_dir = "v", "o"
    assert defaults == expected
    assert defaults.decode_workers == min(8, os.cpu_count() or 1)  # one rule for the decoding processes
    assert "train.steps: optimizer steps; default 10000" in " ".join(parser.format_help().split())


def test_shipped_configs_load_and_flags_override_them():
    names = sorted(p.stem for p in TOKENIZER_CONFIG_DIR.glob("*.yaml"))
    assert names == ["quickstart", "ucf101"]
    quick = load_tokenizer_config("quickstart", REQUIRED)
    assert (quick.model.preset, quick.data.clip.frames, quick.data.clip.resolution) == ("tiny-skip", 9, 32)
    assert quick.loss.l1_weight == 0.0 and load_tokenizer_config(None, REQUIRED).loss.l1_weight == 1.0
    paper, _ = config_from_arguments(["--config", "ucf101", "--videos", "v", "--out", "o", "--batch-size", "2"])
    assert paper.model.preset == "paper" and paper.train.batch_size == 2 and paper.data.clip.frames == 17
    assert paper.name == "ucf101"


def test_refusals_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'data.bogus'"):
        load_tokenizer_config(None, REQUIRED + ["data.bogus=1"])
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        load_tokenizer_config(None, REQUIRED + ["train.steps=true"])
    with pytest.raises(ConfigError, match="data.clip.frames must be >= 1, got 0"):
        load_tokenizer_config(None, REQUIRED + ["data.clip.frames=0"])
    with pytest.raises(ConfigError, match=r"data.videos \(--videos\) is required"):
        load_tokenizer_config(None, ["train.out_dir=o"])
    with pytest.raises(ConfigError, match="loss.l1_weight must be >= 0, got -1.0"):
        load_tokenizer_config(None, REQUIRED + ["loss.l1_weight=-1"])
    with pytest.raises(ConfigError, match="--preset 'huge' is not one of tiny, tiny-skip, small, paper"):
        load_tokenizer_config(None, REQUIRED + ["model.preset=huge"])
    with pytest.raises(ConfigError, match="unknown config 'nope'.*quickstart, ucf101"):
        load_tokenizer_config("nope", REQUIRED)


def test_print_config_round_trips(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nbp_ds.cli.train_tokenizer", "--config", "quickstart",
                             "--videos", "v", "--out", "o", "train.seed=3", "--print-config"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = tmp_path / "printed.yaml"
    printed.write_text(result.stdout)
    assert yaml.safe_load(result.stdout)["train"]["seed"] == 3
    again = load_tokenizer_config(printed)
    expected = load_tokenizer_config("quickstart", REQUIRED + ["train.seed=3"])
    again.name = expected.name
    assert again == expected


def test_the_optimizer_settings_reach_both_optimizers(tmp_path):
    """train.betas, train.weight_decay (the tokenizer's AdamW) and train.disc_betas (the discriminator's) are what
    the saved optimizers hold after a step; out of range they are refused by name."""
    videos = dataset(tmp_path / "videos", classes=2, per_class=1)
    cfg, _ = config_from_arguments([
        "--videos", str(videos), "--out", str(tmp_path / "run"), "--preset", "tiny", "--frames", "5",
        "--resolution", "16", "--batch-size", "2", "--workers", "0", "--steps", "1", "--adversarial-weight", "0.1",
        "--adversarial-start", "0", "train.betas=[0.8, 0.99]", "train.weight_decay=0.02",
        "train.disc_betas=[0.3, 0.7]", "train.threads=1"])
    threads = torch.get_num_threads()
    try:
        train_tokenizer(cfg)
    finally:
        torch.set_num_threads(threads)  # train.threads sets this process' torch, which the next tests share
    step = next((tmp_path / "run" / "checkpoints").glob("step*"))
    tokenizer = torch.load(step / "state.pt", weights_only=False)["opt"]["param_groups"]
    discriminator = torch.load(step / "discriminator.pt", weights_only=False)["optimizer"]["param_groups"]
    assert [(g["betas"], g["weight_decay"]) for g in tokenizer] == [((0.8, 0.99), 0.02)]
    assert [g["betas"] for g in discriminator] == [(0.3, 0.7)]
    for bad, named in (("train.betas=[0.9]", "train.betas must be two numbers in [0, 1)"),
                       ("train.disc_betas=[0.5, 1.0]", "train.disc_betas must be two numbers in [0, 1)"),
                       ("train.weight_decay=-0.1", "train.weight_decay must be >= 0, got -0.1")):
        with pytest.raises(ConfigError, match=re.escape(named)):
            load_tokenizer_config(None, REQUIRED + [bad])
