"""Run configs: command-line overrides as users type them, and refusals that name the key."""

from __future__ import annotations

import pytest

from nbp_ds.config import ConfigError, load_config


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
