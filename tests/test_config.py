"""Run configs: command-line overrides as users type them, and refusals that name the key."""

from __future__ import annotations

import pytest

from nbp_ds.config import load_config
from nbp_ds.errors import ConfigError


def test_overrides_parse_as_users_type_them():
    cfg = load_config("tiny", ["train.lr=3e-4", "layout.block=[1,2,2]", "train.sample_tokenizer=runs/tok",
                               "model.attention=sdpa", "train.steps=12"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 3e-4 as text
    assert cfg.layout.block == [1, 2, 2] and cfg.train.steps == 12 and cfg.model.attention == "sdpa"


@pytest.mark.parametrize("override, named", [
    ("train.stepz=3", "train.stepz"),
    ("train.lr=fast", "train.lr"),
    ("train.steps=2.5", "train.steps"),
    ("layout.block=[1,1,3]", "layout.block"),
    ("model.attention=magic", "model.attention"),
    ("train.steps", "key=value"),
])
def test_bad_overrides_are_refused_by_name(override, named):
    with pytest.raises(ConfigError, match=named.replace("[", r"\[")):
        load_config("tiny", [override])


def test_data_train_takes_urls_pipes_and_mixtures_from_the_command_line():
    cfg = load_config("tiny", ["data.train=https://h/t-{000..009}.tar::pipe:cat /x/y.tar", "data.retries=5"])
    assert cfg.data.train == "https://h/t-{000..009}.tar::pipe:cat /x/y.tar" and cfg.data.retries == 5
    cfg = load_config("tiny", ['data.train=[{shards: "https://h/a-{0..3}.tar", weight: 0.7, name: web},'
                               ' {shards: [a.tar, b.tar], weight: 3}]'])
    assert cfg.data.train == [{"shards": "https://h/a-{0..3}.tar", "weight": 0.7, "name": "web"},
                              {"shards": ["a.tar", "b.tar"], "weight": 3}]


@pytest.mark.parametrize("override, named", [
    ("data.train=[{shards: a.tar, weight: 0}]", r"data.train\[0\].weight"),
    ("data.train=[{shards: a.tar}, {weight: 1}]", r"data.train\[1\].shards"),
    ("data.train=[{shards: a.tar, wieght: 1}]", r"data.train\[0\].wieght"),
    ("data.train=[{shards: a.tar, name: x}, {shards: b.tar, name: x}]", r"data.train\[1\].name 'x' is used twice"),
    ("data.train=[{shards: a.tar, name: 'a/b'}]", r"data.train\[0\].name"),
    ("data.train={shards: a.tar}", "data.train: expected shards"),
    ("data.val=[{shards: a.tar, weight: 1}]", "mixtures with weights are for data.train only"),
    ("data.retries=-1", "data.retries"),
    ("data.retry_backoff=-0.5", "data.retry_backoff"),
    ("data.shuffle_buffer=0", "data.shuffle_buffer"),
])
def test_bad_data_settings_are_refused_by_name(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config("tiny", [override])


def test_layout_config_is_the_layout_data():
    """Layout.from_config copies a LayoutConfig by field name: both must name the same fields (bar the vocab)."""
    import dataclasses

    from nbp_ds.config import LayoutConfig
    from nbp_ds.layout import Layout

    layout_fields = {f.name for f in dataclasses.fields(Layout)} - {"vocab_size"}
    assert layout_fields == {f.name for f in dataclasses.fields(LayoutConfig)}


def test_layout_refuses_bad_rules_built_directly():
    """The rules live in Layout: a Layout made without a run config is checked too."""
    from nbp_ds.layout import Layout

    with pytest.raises(ConfigError, match=r"layout.block=\[1, 1, 3\] does not divide"):
        Layout(grid=(2, 4, 4), block=(1, 1, 3), vocab_size=16)
    with pytest.raises(ConfigError, match="layout.hybrid=true needs at least 2 blocks, got 1"):
        Layout(grid=(1, 2, 2), block=(1, 2, 2), vocab_size=16, hybrid=True)
    with pytest.raises(ConfigError, match="layout.hybrid=true needs at least 4 blocks, got 3"):
        Layout(grid=(3, 2, 2), block=(1, 2, 2), vocab_size=16, hybrid=True, hybrid_blocks=3)
    with pytest.raises(ConfigError, match="layout.hybrid_blocks=2 is only used with layout.hybrid=true"):
        Layout(grid=(3, 2, 2), block=(1, 2, 2), vocab_size=16, hybrid_blocks=2)
    with pytest.raises(ConfigError, match="layout.hybrid_blocks must be a positive integer, got 0"):
        Layout(grid=(3, 2, 2), block=(1, 2, 2), vocab_size=16, hybrid=True, hybrid_blocks=0)


def test_a_yaml_file_starts_from_another_by_name_or_path(tmp_path):
    """``base:`` names a shipped config or a file beside this one; the file sets only what differs."""
    (tmp_path / "mine.yaml").write_text("base: ucf101-700m\ntrain:\n  lr: 1.0e-4\n")
    (tmp_path / "smaller.yaml").write_text("base: mine.yaml\nmodel:\n  n_layer: 2\n")
    cfg, shipped = load_config(str(tmp_path / "smaller.yaml")), load_config("ucf101-700m")
    assert (cfg.train.lr, cfg.model.n_layer) == (1.0e-4, 2) and shipped.model.n_layer == 24
    assert (cfg.model.d_model, cfg.layout.grid, cfg.layout.hybrid) == (1536, [5, 16, 16], True)  # inherited
    assert cfg.train.steps == shipped.train.steps
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(str(tmp_path / "loop.yaml"))
