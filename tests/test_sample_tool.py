"""nbp-sample: refuses bad input before any work; writes mp4s, grid, tokens and decoded frames."""

from __future__ import annotations

import json
import subprocess
import sys
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
    return write_export(tmp / "w.safetensors"), tmp / "tok", tmp


def test_samples_every_class(assets):
    weights, tok, tmp = assets
    out = tmp / "out"
    result = sample("--weights", str(weights), "--tokenizer", str(tok), "--out", str(out), "--label", "0",
                    "--label", "5", "--num", "2", "--classes", str(tmp / "classes.json"), "--top-k", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.mp4")) == ["c0_000.mp4", "c0_001.mp4", "c5_000.mp4", "c5_001.mp4"]
    assert np.load(out / "tokens.npy").shape == (4, 3, 8, 8)
    assert np.load(out / "videos.npy").shape == (4, 9, 32, 32, 3)
    assert list(np.load(out / "labels.npy")) == [0, 0, 5, 5]
    assert (out / "grid.png").stat().st_size > 0
    assert "24 forward passes per video" in result.stdout  # 3x8x8 tokens in rows of 8: 24 blocks


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
