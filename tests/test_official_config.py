"""Config for the released models: the new layout options are validated by name, an export's .json run config
loads as a config, and floats written with an exponent (3e-4, 1e-05) are floats."""

from __future__ import annotations

import json

import pytest

from nbp_ds.config import load_config
from nbp_ds.errors import ConfigError
from nbp_ds.layout import Layout

K600 = ["layout.condition=frames", "layout.context_frames=2", "layout.num_classes=0", "layout.bov=false"]
UCF = ["layout.hybrid=true", "layout.num_classes=2", "layout.class_prefixes=[[1,5,2],[1,7,8]]",
       "layout.text_vocab_size=9", "model.class_dropout=0"]


@pytest.mark.parametrize("overrides,message", [
    (["layout.bov=false"], "layout.bov=false needs layout.condition=frames"),
    (UCF[:2] + ["layout.class_prefixes=[[1,2]]", "layout.text_vocab_size=9", "model.class_dropout=0"],
     "class_prefixes has 1 entries for layout.num_classes=2"),
    (UCF[:2] + ["layout.class_prefixes=[[1,2],[3]]", "layout.text_vocab_size=9", "model.class_dropout=0"],
     "same positive length, got lengths \\[1, 2\\]"),
    (UCF[:3] + ["layout.text_vocab_size=8", "model.class_dropout=0"],
     "class_prefixes\\[1\\] holds token id 8, outside \\[0, layout.text_vocab_size=8\\)"),
    (UCF[:4], "model.class_dropout=0.1 needs a null class"),
    (["layout.text_vocab_size=5"], "text_vocab_size=5 is only used with layout.class_prefixes"),
    (["layout.token_ids=official"], "token_ids=official describes the released sequences only"),
    (["layout.token_ids=theirs"], "layout.token_ids must be one of nbp_ds, official"),
    (["model.arch=bert"], "model.arch must be one of llama, gpt2"),
])
def test_layout_options_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


def test_token_ids_of_the_two_released_forms():
    ucf = Layout.from_config(load_config("tiny", UCF + ["layout.token_ids=official"]).layout, 64)
    # BOV 0, placeholders 1..3, text 4..12, video 13..76
    assert (ucf.bov_token, ucf.text_token_offset, ucf.video_token_offset, ucf.embedding_size) == (0, 4, 13, 77)
    assert ucf.prefix_len == 3 and ucf.seq_len == 3 + 48
    assert [int(i) for i in ucf.special_ids[3:3 + 8]] == [0, -1, -1, -1, -1, 1, 2, 3]
    k600 = Layout.from_config(load_config("tiny", K600 + ["layout.token_ids=official"]).layout, 64)
    assert (k600.embedding_size, k600.video_token_offset, k600.seq_len) == (64, 0, 48 - 4)
    ours = Layout.from_config(load_config("tiny", UCF).layout, 64)  # the same prefixes in nbp_ds' id order
    assert (ours.bov_token, ours.placeholder_token, ours.text_token_offset, ours.embedding_size) == (64, 65, 66, 75)


def test_json_run_config_and_exponent_floats(tmp_path):
    cfg = load_config("tiny", ["train.lr=3e-4", "model.norm_eps=1e-05"])
    assert cfg.train.lr == 3e-4 and cfg.model.norm_eps == 1e-5
    path = tmp_path / "export.json"
    path.write_text(json.dumps(cfg.to_dict(), indent=1))  # json.dumps writes 1e-05, YAML 1.1 would read a string
    again = load_config(path, ["train.steps=7"])
    assert again.model.norm_eps == 1e-5 and again.train.steps == 7 and again.layout == cfg.layout
    with pytest.raises(ConfigError, match="expected float, got 'fast'"):
        load_config("tiny", ["train.lr=fast"])
