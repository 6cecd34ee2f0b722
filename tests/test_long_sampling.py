"""Sampling past the training clip (nbp_ds.generate.long): the first clip is the short sample; the rolling cache
gives the logits and tokens of recomputing every window where the two are the same computation (one layer: a
slot's keys and values depend only on its token and place), in the eager and the static decoder, greedy and
seeded, for 3x the clip; deeper models decode the same in both decoders; every draw of the long video comes from
its own place in the random stream; no position outside the clip's is used; models with learned positions (the
released generators' architecture) recompute; what cannot slide is refused by name; nbp-sample's long runs
resume to the uninterrupted videos."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import nbp_ds.generate.decode as eager_module
import nbp_ds.generate.static as static_module
from nbp_ds import ffmpeg_tools
from nbp_ds.config import load_config
from nbp_ds.generate import generate, generate_long, stream_uniforms, video_keys
from nbp_ds.generate.folder import RECORDS_FILE, read_records
from nbp_ds.generate.sampler import SamplerOptions, sample_videos
from nbp_ds.model import build_model
from nbp_ds.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CLIP = ["layout.grid=[4,4,4]", "model.attention=sdpa"]  # T = 4 latent frames; 3x the clip = 12
UNCOND = ["layout.condition=none", "layout.num_classes=0"]
CASES = {
    "nbp-class": ["layout.block=[1,1,4]"],
    "hybrid-class": ["layout.block=[1,1,4]", "layout.hybrid=true"],
    "hybrid-first-frame": ["layout.block=[1,1,4]", "layout.hybrid=true", "layout.hybrid_blocks=4"],
    "frame-blocks-uncond": ["layout.block=[1,4,4]", *UNCOND],
    "frames": ["layout.condition=frames", "layout.context_frames=1", "layout.num_classes=0"],
}
SAMPLINGS = {"greedy": {"temperature": 0}, "seeded": {"temperature": 1.3, "top_k": 20, "seed": 7}}
LONG = 12


def model_for(overrides: list[str], layers: int):
    torch.manual_seed(0)
    model = build_model(load_config("tiny", [*CLIP, *overrides, f"model.n_layer={layers}"])).eval()
    with torch.no_grad():
        model.head.weight.mul_(8)  # spread the logits so that greedy choices are not near ties
    return model


def conditions(model, b: int = 2) -> dict:
    lay = model.layout
    if lay.condition == "class":
        return {"label": torch.tensor([1, 3])[:b]}
    if lay.condition == "frames":
        g = torch.Generator().manual_seed(5)
        return {"context": torch.randint(0, 64, (b, lay.context_frames, *lay.grid[1:]), generator=g)}
    return {}


def long_run(model, long_mode: str, mode: str, sampling: dict, monkeypatch, frames: int = LONG, **kw):
    """(tokens, {long raster position: logits [B, V]}) of one long sample, the logits caught where tokens are
    drawn."""
    caught: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = eager_module.draw_tokens

    def recording(logits, sampling_, keys, targets):
        caught.append((targets.clone(), logits.clone()))
        return original(logits, sampling_, keys, targets)

    monkeypatch.setattr(eager_module, "draw_tokens", recording)
    monkeypatch.setattr(static_module, "draw_tokens", recording)
    tokens, stats = generate_long(model, 2, frames, mode=mode, long_mode=long_mode, **conditions(model), **sampling,
                                  **kw)
    monkeypatch.undo()
    positions = torch.cat([t for t, _ in caught])
    logits = torch.cat([x for _, x in caught], dim=1)  # [B, tokens drawn, V]
    order = positions.argsort()
    return tokens, (positions[order], logits[:, order]), stats


@pytest.mark.parametrize("case", list(CASES))
def test_rolling_cache_equals_recomputing_every_window_in_one_layer(case, monkeypatch):
    """One layer: the kept slots' keys and values are what a recomputed window gives (a function of the token fed
    and its place), so logits agree to fp32 rounding (1e-4 on logits of size ~10: the recomputed window is fed in
    one pass, the rolling one block by block) and tokens agree exactly, greedy and seeded, eager and static,
    for 3x the clip."""
    model = model_for(CASES[case], layers=1)
    for name, sampling in SAMPLINGS.items():
        runs = {(lm, mode): long_run(model, lm, mode, sampling, monkeypatch)
                for lm in ("rolling", "recompute") for mode in ("eager", "static")}
        reference_tokens, reference_logits, _ = runs["recompute", "eager"]
        assert reference_tokens.shape == (2, LONG, 4, 4)
        for key, (tokens, (positions, logits), _) in runs.items():
            assert torch.equal(tokens, reference_tokens), (case, name, key)
            assert torch.equal(positions, reference_logits[0])  # every token drawn once, at its own place
            assert len(positions) >= (LONG - 1) * 16  # every predicted token of the long video
            torch.testing.assert_close(logits, reference_logits[1], rtol=0, atol=1e-4)


@pytest.mark.parametrize("long_mode", ["rolling", "recompute"])
def test_the_first_clip_is_the_short_sample_and_both_decoders_agree(long_mode, monkeypatch):
    """Two layers (where rolling and recompute differ by design): the first clip is generate's video for the same
    seed, and the eager and the static decoder give the same long video."""
    model = model_for(CASES["nbp-class"], layers=2)
    sampling = SAMPLINGS["seeded"]
    short, _ = generate(model, 2, mode="eager", **conditions(model), **sampling)
    eager, _, stats = long_run(model, long_mode, "eager", sampling, monkeypatch)
    static, _, _ = long_run(model, long_mode, "static", sampling, monkeypatch)
    assert torch.equal(eager[:, :4], short)
    assert torch.equal(eager, static)
    assert stats["long_mode"] == long_mode
    per_frame = 4 + (long_mode == "recompute")  # 4 row blocks, and the recomputed window's pass
    assert stats["forward_passes"] == 16 + (LONG - 4) * per_frame


def test_every_token_of_the_long_video_draws_from_its_own_place_in_the_stream():
    """A model whose logits are all equal draws token i of the video from uniform i of the (seed, video) stream
    alone: the expected tokens come from the stream directly, and later frames are not copies of each other."""
    model = model_for(CASES["nbp-class"], layers=1)
    with torch.no_grad():
        model.head.weight.zero_()
    tokens, _ = generate_long(model, 2, LONG, label=torch.tensor([0, 2]), temperature=1.0, seed=21)
    positions = torch.arange(16, LONG * 16)  # frame 0 row 0 is predicted too, but check from the first block on
    u = stream_uniforms(video_keys(21, torch.arange(2)), positions)
    expected = (u * 64).floor().long()
    assert torch.equal(tokens.reshape(2, -1)[:, 16:], expected)
    assert not torch.equal(tokens[:, 5], tokens[:, 6])


def test_no_position_outside_the_clip_is_used():
    """Every pass of a long sample feeds positions of the clip's sequence (its rotary rows and cache slots)."""
    model = model_for(CASES["hybrid-class"], layers=2)
    used: list[int] = []
    original = model.embed_positions

    def spy(ids, start):
        used.append(int(start) + ids.shape[1])
        return original(ids, start)

    model.embed_positions = spy
    for long_mode in ("rolling", "recompute"):
        generate_long(model, 2, LONG, label=torch.tensor([0, 1]), temperature=0, mode="eager", long_mode=long_mode)
    assert used and max(used) <= model.layout.seq_len


@pytest.mark.parametrize("overrides", [
    ["model.arch=gpt2", "layout.block=[1,1,4]", "layout.hybrid=true"],
    ["model.arch=gpt2", "layout.condition=frames", "layout.context_frames=1", "layout.num_classes=0",
     "layout.bov=false"],
], ids=["gpt2-hybrid-class", "gpt2-frames-no-bov"])
def test_learned_positions_recompute_and_refuse_rolling(overrides, monkeypatch):
    """The released generators' architecture (learned absolute positions): auto recomputes each window, the eager
    and static decoders agree, and rolling is refused with the way out named."""
    model = model_for(overrides, layers=2)
    eager, _, stats = long_run(model, "auto", "eager", SAMPLINGS["seeded"], monkeypatch)
    static, _, _ = long_run(model, "auto", "static", SAMPLINGS["seeded"], monkeypatch)
    assert stats["long_mode"] == "recompute" and torch.equal(eager, static)
    with pytest.raises(ValueError, match="long_mode='recompute'"):
        generate_long(model, 2, LONG, long_mode="rolling", **conditions(model))


@pytest.mark.parametrize("overrides, kwargs, message", [
    (["layout.block=[2,1,4]"], {}, r"layout.block\[0\] = 1"),
    ([], {"sink_frames": 3}, r"sink_frames must be in 0..2"),
    (["layout.hybrid=true"], {"sink_frames": 0}, "keep it as a sink"),
    ([], {"latent_frames": 3}, "at least the clip's 4 latent frames"),
    ([], {"long_mode": "sliding"}, "long_mode must be one of"),
])
def test_what_cannot_slide_is_refused_by_name(overrides, kwargs, message):
    model = model_for(["layout.block=[1,1,4]", *overrides], layers=1)
    args = {"latent_frames": LONG, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_long(model, 2, label=torch.tensor([0, 1]), **args)


def test_sink_frames_zero_and_two_slide_too(monkeypatch):
    """Other sink counts keep the one-layer equality (the BOV block alone, or two frames, stay in place)."""
    model = model_for(CASES["nbp-class"], layers=1)
    for sinks in (0, 2):
        rolling, _, _ = long_run(model, "rolling", "eager", SAMPLINGS["seeded"], monkeypatch, sink_frames=sinks)
        again, _, _ = long_run(model, "recompute", "static", SAMPLINGS["seeded"], monkeypatch, sink_frames=sinks)
        assert torch.equal(rolling, again), sinks


# ---- nbp-sample ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def long_assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("long")
    cfg = load_config("quickstart", ["model.n_layer=2", "model.d_model=32", "model.n_head=2"])
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in build_model(cfg).state_dict().items()}
    save_file(state, str(tmp / "w.safetensors"), metadata={"nbp_ds_config": json.dumps(cfg.to_dict()), "dtype": "fp32"})
    build_tokenizer("tiny", seed=1).save(tmp / "tok")
    return tmp


def test_a_resumed_long_run_gives_the_uninterrupted_videos(long_assets, tmp_path):
    """nbp-sample --frames 25 (3x the quickstart's 9-frame clip): a run cut after one video and run again holds
    the videos, tokens and frames, of a run never interrupted (in batches of one, so each video's frames are
    decoded alone); other --frames for the same folder are refused."""
    def options(out, frames=25):
        return SamplerOptions(weights=str(long_assets / "w.safetensors"), tokenizer=str(long_assets / "tok"),
                              out=str(out), num=1, labels=[1, 4, 7], batch_size=1, mp4=False, writers=1,
                              mode="static", frames=frames)

    whole = tmp_path / "whole"
    summary = sample_videos(options(whole), progress=False)
    assert summary.videos == 3 and summary.frames == 3 * 25
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    lines = (cut / RECORDS_FILE).read_text().splitlines()
    (cut / RECORDS_FILE).write_text(lines[0] + "\n")  # as if killed after the first batch
    for record in [json.loads(line) for line in lines[1:]]:
        (cut / record["frames"]).unlink()
        (cut / record["tokens"]).unlink()
    resumed = sample_videos(options(cut), progress=False)
    assert resumed.skipped == 1 and resumed.videos == 2
    for index, record in read_records(whole).items():
        again = read_records(cut)[index]
        for kind in ("tokens", "frames"):
            assert np.array_equal(np.load(cut / again[kind]), np.load(whole / record[kind])), (index, kind)
    assert np.load(whole / record["tokens"]).shape == (7, 8, 8)
    with pytest.raises(Exception, match="other settings"):
        sample_videos(options(cut, frames=33), progress=False)


def counted_mp4_frames(path) -> int:
    """Frames of an mp4 as ffprobe decodes and counts them (not the sampler's own reading)."""
    probe = subprocess.run([ffmpeg_tools.ffprobe(), "-v", "error", "-count_frames", "-select_streams", "v:0",
                            "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", str(path)],
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    return int(probe.stdout.strip())


@pytest.mark.skipif(not all(map(ffmpeg_tools.find_tool, ffmpeg_tools.TOOLS)),
                    reason=f"needs ffmpeg and ffprobe: {ffmpeg_tools.INSTALL_HINT}")
def test_nbp_sample_frames_129_from_the_command_line_with_a_quickstart_model(long_assets, tmp_path):
    """`nbp-sample --frames 129` (14x the quickstart's 9-frame clip, 33 latent frames) run as a program: each video
    has 129 frames in its mp4 (counted by ffprobe) and in its frames array, 33 latent frames of tokens; the files
    are named by --classes, and sampling.json records the long mode, the sink frames and --classes. --tensorboard
    shows each whole: an animated GIF of 129 frames per video in the event file, tagged by its stem."""
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({f"shape{i}": i for i in range(12)}))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "nbp_ds.cli.sample", "--weights", str(long_assets / "w.safetensors"),
                             "--tokenizer", str(long_assets / "tok"), "--out", str(out), "--label", "2", "--label",
                             "7", "--frames", "129", "--classes", str(classes), "--device", "cpu", "--writers", "2",
                             "--tensorboard", str(tmp_path / "tb")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    stems = sorted(p.stem for p in out.glob("*.mp4"))
    assert stems == ["shape2_000", "shape7_000"]
    for stem in stems:
        assert counted_mp4_frames(out / f"{stem}.mp4") == 129
        assert np.load(out / "frames" / f"{stem}.npy").shape == (129, 32, 32, 3)
        assert np.load(out / "tokens" / f"{stem}.npy").shape == (33, 8, 8)
    settings = json.loads((out / "sampling.json").read_text())
    assert settings["long"] == {"latent_frames": 33, "long_mode": "recompute", "sink_frames": 1}
    assert settings["classes"] == str(classes.resolve())
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == [f"samples/{stem}" for stem in stems]
    for stem in stems:
        gif = Image.open(io.BytesIO(events.Images(f"samples/{stem}")[0].encoded_image_string))
        assert gif.format == "GIF" and gif.n_frames == 129
