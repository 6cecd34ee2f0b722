"""The shipped configs use the paper's layer/width/head counts; parameter counts add up."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from nbp_ds.config import available_configs, load_config
from nbp_ds.model import PAPER_PRESETS, PRESET_CONFIGS, build_model, count_params, default_ffn_dim

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", list(PAPER_PRESETS))
def test_preset_matches_paper_and_analytic_count(preset):
    paper = PAPER_PRESETS[preset]
    cfg = load_config(PRESET_CONFIGS[preset])
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head) == (paper.n_layer, paper.d_model, paper.n_head)
    with torch.device("meta"):
        model = build_model(cfg)
    counts = count_params(paper.n_layer, paper.d_model, default_ffn_dim(paper.d_model), cfg.model.vocab_size,
                          model.layout.embedding_size)
    assert model.num_params() == counts["total"]
    assert model.num_params(exclude_embeddings=True) == counts["non_embedding"]
    # the paper names sizes by the transformer layers: 12 * d^2 per layer with a SwiGLU of ~8/3 d
    nominal = {"700m": 0.7e9, "1.2b": 1.2e9, "3b": 3.0e9}[preset]
    assert 0.9 * nominal < counts["transformer_layers"] < 1.25 * nominal


def test_every_shipped_config_loads():
    for name in available_configs():
        load_config(name)


def test_count_params_tool_prints_the_presets():
    out = subprocess.run([sys.executable, "-m", "nbp_ds.cli.count_params"], check=True, cwd=ROOT,
                         capture_output=True, text=True).stdout
    for name in PAPER_PRESETS:
        assert name in out
    print(out)
