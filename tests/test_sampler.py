"""The sampler library (nbp_ds.generate.sampler) and the one conditions check it shares with ``generate``: each
refusal names the argument as its caller writes it (``label=`` in Python, ``--label`` for nbp-sample), and the
sampler refuses before it touches the output folder."""

from __future__ import annotations

import pytest
import torch
from test_sample_tool import write_export

from nbp_ds.errors import UsageError
from nbp_ds.generate.conditions import check_conditions
from nbp_ds.generate.sampler import FLAGS, SamplerOptions, sample_videos
from nbp_ds.layout import Layout
from nbp_ds.tokenizer import build_tokenizer

GRID = dict(grid=(3, 8, 8), block=(1, 1, 8), vocab_size=1000)
CLASSES = Layout(**GRID, condition="class", num_classes=2)
TEXT_CLASSES = Layout(**GRID, condition="class", num_classes=2, class_prefixes=((1, 2), (3, 4)), text_vocab_size=8)
NONE = Layout(**GRID)
FRAMES = Layout(**GRID, condition="frames", context_frames=1)

# (layout, label, cfg_scale, context given) -> the message in Python's words, then in nbp-sample's
REFUSED = [
    (CLASSES, None, None, False, "this model is class-conditional: pass label= (class indices in [0, 2))",
     "this model is class-conditional: pass --label (class indices in [0, 2))"),
    (CLASSES, [0, 2], None, False, "label: labels must be in [0, 2) (layout.num_classes), got [2]",
     "--label: labels must be in [0, 2) (layout.num_classes), got [2]"),
    (TEXT_CLASSES, [0], 2.0, False, "cfg_scale= needs a null class", "--cfg-scale needs a null class"),
    (NONE, [0], None, False, "label= and cfg_scale= need a class-conditional model; this one has "
                             "layout.condition=none",
     "--label and --cfg-scale need a class-conditional model; this one has layout.condition=none"),
    (FRAMES, None, 3.0, True, "label= and cfg_scale= need a class-conditional model; this one has "
                              "layout.condition=frames",
     "--label and --cfg-scale need a class-conditional model; this one has layout.condition=frames"),
    (FRAMES, None, None, False, "this model predicts frames after 1 given latent frames: pass context=",
     "this model predicts frames after 1 given latent frames: pass --context"),
    (CLASSES, [1], None, True, "context= is for frame-prediction models; this one has layout.condition=class",
     "--context is for frame-prediction models; this one has layout.condition=class"),
]


@pytest.mark.parametrize("case", range(len(REFUSED)))
def test_conditions_are_refused_in_the_callers_words(case):
    layout, label, scale, context, python, flags = REFUSED[case]
    label = None if label is None else torch.tensor(label)
    with pytest.raises(ValueError) as python_error:
        check_conditions(layout, label, scale, context)
    assert str(python_error.value).startswith(python)
    with pytest.raises(ValueError) as flag_error:
        check_conditions(layout, label, scale, context, FLAGS)
    assert str(flag_error.value).startswith(flags)


def test_conditions_that_fit_pass():
    check_conditions(CLASSES, torch.tensor([0, 1]), 2.0, False)
    check_conditions(TEXT_CLASSES, torch.tensor([1]), 1.0, False)  # scale 1 is no guidance: no null class needed
    check_conditions(NONE, None, None, False)
    check_conditions(FRAMES, None, 1.0, True)


@pytest.fixture(scope="module")
def text_prefix_model(tmp_path_factory):
    """An export whose 12 classes are text prefixes (no null class, as the authors' UCF-101 models), and a
    tokenizer that fits it."""
    tmp = tmp_path_factory.mktemp("sampler")
    prefixes = [[i, i + 1] for i in range(12)]
    weights = write_export(tmp / "text.safetensors", f"layout.class_prefixes={prefixes}".replace(" ", ""),
                           "layout.text_vocab_size=16", "model.class_dropout=0")
    build_tokenizer("tiny", seed=1).save(tmp / "tok")
    return weights, tmp / "tok"


@pytest.mark.parametrize(("change", "message"), [
    ({"cfg_scale": 2.0}, "--cfg-scale needs a null class"),  # once refused only by generate, after --out was made
    ({"mode": "graph"}, "--mode graph: mode='graph' needs a model on a CUDA device"),
    ({"labels": [3, 12]}, "--label: labels must be in [0, 12) (layout.num_classes), got [12]"),
    ({"writers": 0}, "--writers must be >= 1, got 0"),
    ({"seed": -1}, "--seed must be a non-negative int, got -1"),
])
def test_the_sampler_refuses_before_it_touches_the_output_folder(text_prefix_model, tmp_path, change, message):
    weights, tok = text_prefix_model
    options = SamplerOptions(weights=str(weights), tokenizer=str(tok), out=str(tmp_path / "out"), device="cpu",
                             **change)
    with pytest.raises(UsageError) as error:
        sample_videos(options, progress=False)
    assert str(error.value).startswith(message)
    assert not (tmp_path / "out").exists()
