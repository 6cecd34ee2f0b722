"""The shipped configs use the paper's layer/width/head counts; parameter counts add up."""

from __future__ import annotations

import re
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


def test_the_readme_tables_preset_sizes_and_zero_stages():
    """The preset table of docs/configuration.md (layers, width, heads, total / non-embedding parameters in
    millions, read from the page itself) is what the shipped configs build, and the ZeRO choice docs/training.md
    states is theirs: zero2 where the 700M states fit one GPU, zero3 for 1.2B and 3B."""
    readme = (ROOT / "docs" / "configuration.md").read_text()
    rows = dict(re.findall(r"^\| (700M|1\.2B|3B) \| (\d+ \| \d+ \| \d+ \| \d+M / \d+M) \|$", readme, re.M))
    assert sorted(rows) == ["1.2B", "3B", "700M"]
    for preset, row in rows.items():
        cfg = load_config(PRESET_CONFIGS[preset.lower()])
        model = build_model(cfg, device="meta")
        built = (f"{cfg.model.n_layer} | {cfg.model.d_model} | {cfg.model.n_head} | "
                 f"{round(model.num_params() / 1e6)}M / {round(model.num_params(exclude_embeddings=True) / 1e6)}M")
        assert built == row, preset
    stages = {name: load_config(name).deepspeed.config for name in ("ucf101-700m", "k600-700m", "ucf101-1.2b",
                                                                     "ucf101-3b")}
    assert stages == {"ucf101-700m": "zero2", "k600-700m": "zero2", "ucf101-1.2b": "zero3", "ucf101-3b": "zero3"}
    assert "`ucf101-700m` and `k600-700m` use `deepspeed.config=zero2`" in (ROOT / "docs" / "training.md").read_text()
