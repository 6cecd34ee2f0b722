"""nbp-sample's promise "other arguments for the same --out are refused, naming what changed", option by option
(issue 36): every option of the sampler is either recorded in sampling.json (it changes the videos or the files
made of them) or listed here as one that does not, with the reason; each recorded one, changed alone, is refused
by the folder naming it. One folder then never mixes videos of two settings (one FVD over both)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_sample_tool import write_export
from video_fixtures import lavfi_video

from nbp_ds.errors import UsageError
from nbp_ds.generate.folder import open_run
from nbp_ds.generate.sampler import SamplerOptions, load_inputs, run_settings
from nbp_ds.tokenizer import build_tokenizer

# options that leave every video and every file the same, and why
NOT_RECORDED = {
    "out": "the folder itself",
    "restart": "discards the folder's run instead of resuming it",
    "writers": "threads writing the same files",
    "device": "where the same draws are computed (their stream is keyed by seed, video and position)",
    "tensorboard": "shows the finished videos in TensorBoard; writes no video",
    "mode": "the static and graph decoders give the eager decoder's tokens (tests/test_static_decoding.py)",
    # past the clip only (--frames): then recorded under "long" and refused when changed
    # (tests/test_long_sampling.py::test_a_resumed_long_run_gives_the_uninterrupted_videos)
    "long_mode": "chooses how windows past the clip are filled; no video is longer than the clip without --frames",
    "sink_frames": "the frames windows past the clip keep; no video is longer than the clip without --frames",
}

# each recorded option changed alone: (the other value, the settings key the refusal names)
CLASS_MODEL_CHANGES = {
    "weights": ("other.safetensors", "weights"),
    "tokenizer": ("tok2", "tokenizer"),
    "num": (3, "num"),
    "labels": ([0, 6], "labels"),
    "temperature": (0.7, "temperature"),
    "top_k": (9, "top_k"),
    "top_p": (0.8, "top_p"),
    "cfg_scale": (2.0, "cfg_scale"),
    "seed": (1, "seed"),
    "batch_size": (2, "batch_size"),
    "fps": (12.0, "fps"),
    "mp4": (False, "mp4"),
    "dtype": ("bf16", "dtype"),
    "grid": ((5, 8, 8), "grid"),  # another grid than the layout's (the export below trained on packed rows)
    "classes": ("classes.json", "classes"),  # names the files: recorded when given
    "frames": (13, "long"),  # 4 latent frames: one past the layout's 3
}
FRAME_MODEL_CHANGES = {"context": ("clip2.mp4", "context")}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("settings")
    build_tokenizer("tiny", seed=1).save(tmp / "tok")
    build_tokenizer("tiny", seed=2).save(tmp / "tok2")
    write_export(tmp / "w.safetensors", "data.pack_tokens=400")
    (tmp / "classes.json").write_text(json.dumps({f"c{i}": i for i in range(12)}))
    write_export(tmp / "other.safetensors", "model.init_std=0.03")
    # frame prediction starts from given frames, so without the quickstart's token-by-token first frame
    write_export(tmp / "frames.safetensors", "layout.condition=frames", "layout.context_frames=1",
                 "layout.hybrid=false", "layout.hybrid_blocks=1")
    for name, source in (("clip.mp4", "testsrc"), ("clip2.mp4", "mandelbrot")):
        lavfi_video(tmp / name, size="32x32", seconds=2.0, source=source)
    return tmp


def settings_of(options: SamplerOptions) -> dict:
    return run_settings(options, load_inputs(options))


def in_folder(tmp, value):
    in_tmp = isinstance(value, str) and value.endswith((".safetensors", ".mp4", "tok2", ".json"))
    return str(tmp / value) if in_tmp else value


def test_every_option_is_recorded_or_named_as_one_that_changes_no_video():
    options = {f.name for f in dataclasses.fields(SamplerOptions)}
    assert options == set(NOT_RECORDED) | set(CLASS_MODEL_CHANGES) | set(FRAME_MODEL_CHANGES)


@pytest.mark.parametrize("option", list(CLASS_MODEL_CHANGES) + list(FRAME_MODEL_CHANGES))
def test_each_recorded_option_changed_alone_is_refused_by_name(files, tmp_path, option):
    if option in FRAME_MODEL_CHANGES:
        base = SamplerOptions(weights=str(files / "frames.safetensors"), tokenizer=str(files / "tok"),
                              out=str(tmp_path / "out"), num=2, context=str(files / "clip.mp4"), batch_size=4)
        value, key = FRAME_MODEL_CHANGES[option]
    else:
        base = SamplerOptions(weights=str(files / "w.safetensors"), tokenizer=str(files / "tok"),
                              out=str(tmp_path / "out"), num=2, labels=[0, 5], top_k=8, batch_size=4)
        value, key = CLASS_MODEL_CHANGES[option]
    recorded = settings_of(base)
    open_run(tmp_path / "out", recorded)
    open_run(tmp_path / "out", settings_of(base))  # the same again: resumed
    changed = dataclasses.replace(base, **{option: in_folder(files, value)})
    with pytest.raises(UsageError, match=rf"holds a run with other settings \({key}: "):
        open_run(tmp_path / "out", settings_of(changed))
    assert json.loads((tmp_path / "out" / "sampling.json").read_text()) == recorded


def test_other_weights_under_the_same_path_are_refused(files, tmp_path):
    weights = tmp_path / "w.safetensors"
    write_export(weights)
    options = SamplerOptions(weights=str(weights), tokenizer=str(files / "tok"), out=str(tmp_path / "out"),
                             labels=[0])
    open_run(tmp_path / "out", settings_of(options))
    write_export(weights, "model.init_std=0.03")  # other weights written into the same file
    with pytest.raises(UsageError, match=r"\(weights_fingerprint: "):
        open_run(tmp_path / "out", settings_of(options))
