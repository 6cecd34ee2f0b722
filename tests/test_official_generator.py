"""Converting the authors' released generators: their logits exactly, with and without the KV cache, the
UCF-101 class prefixes from a sentencepiece model, and refusals that name what does not fit."""

from __future__ import annotations

import fractions
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from official_fixtures import (
    BLOCK,
    CLASS_NAMES,
    GRID,
    PREFIX,
    VIDEO_CODES,
    official_logits,
    official_mask,
    official_sequence,
    released_generator_weights,
    train_sentencepiece,
    write_generator_ckpt,
)

from nbp_ds import ffmpeg_tools
from nbp_ds.errors import CheckpointError, ConfigError
from nbp_ds.generate import generate
from nbp_ds.official.class_text import class_prefixes, class_text
from nbp_ds.official.generator import convert_generator
from nbp_ds.weights.export import load_exported

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A trained sentencepiece model, classes.json, and both released kinds converted with the library."""
    import sentencepiece

    tmp = tmp_path_factory.mktemp("official")
    spm = train_sentencepiece(tmp)
    text_vocab = sentencepiece.SentencePieceProcessor(model_file=str(spm)).GetPieceSize()
    (tmp / "classes.json").write_text(json.dumps({n: i for i, n in enumerate(CLASS_NAMES)}))
    out = {"tmp": tmp, "spm": spm, "text_vocab": text_vocab}
    for kind in ("ucf", "k600"):
        out[kind] = write_generator_ckpt(tmp / f"{kind}.ckpt", kind, text_vocab if kind == "ucf" else 0)
        convert_generator(tmp / f"{kind}.ckpt", tmp / kind / "model.safetensors",
                          classes=tmp / "classes.json" if kind == "ucf" else None,
                          sentencepiece_model=spm if kind == "ucf" else None)
    return out


def load(files, kind):
    model, cfg = load_exported(files["tmp"] / kind / "model.safetensors")
    model.attention_name = "sdpa"
    return model, cfg


def batch_of(kind, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"tokens": torch.randint(0, VIDEO_CODES, (b, *GRID), generator=g), "label": torch.tensor([0, 3, 4][:b])}


@pytest.mark.parametrize("kind", ["ucf", "k600"])
def test_converted_model_gives_the_authors_logits(files, kind):
    model, cfg = load(files, kind)
    assert cfg.model.arch == "gpt2" and cfg.layout.token_ids == "official"
    batch = batch_of(kind)
    text_vocab = files["text_vocab"] if kind == "ucf" else 0
    prefix = torch.tensor(cfg.layout.class_prefixes)[batch["label"]] if kind == "ucf" else None
    ids = official_sequence(kind, batch["tokens"], prefix, text_vocab)
    assert torch.equal(model.layout.input_ids(batch["tokens"], batch["label"]), ids)  # the same sequence
    mask = official_mask(kind, ids.shape[1], PREFIX if kind == "ucf" else 0)
    assert torch.equal(model.layout.allowed(), mask)  # the same attention mask
    reference = official_logits(files[kind], ids, mask)
    offset = BLOCK + text_vocab if kind == "ucf" else 0
    video = reference[..., offset:offset + VIDEO_CODES]
    with torch.no_grad():
        ours = model.logits(batch).double()
    if kind == "ucf":  # rows after the text prefix predict video tokens 0..N-1
        torch.testing.assert_close(ours, video[:, PREFIX:], rtol=0, atol=1e-4)
    else:  # input z[:-L] -> target z[L:]; nothing predicts the first block
        torch.testing.assert_close(ours[:, BLOCK:], video, rtol=0, atol=1e-4)
        assert bool(torch.isnan(ours[:, :BLOCK]).all())
    assert float(video.abs().max()) > 5  # logits large enough for the tolerance to mean something


@pytest.mark.parametrize("kind,passes", [("ucf", BLOCK + 12 - 1), ("k600", 4)])
def test_kv_cache_gives_the_same_logits(files, kind, passes):
    model, cfg = load(files, kind)
    lay = model.layout
    batch = batch_of(kind)
    label = batch["label"] if kind == "ucf" else None
    with torch.no_grad():
        full = model.head(model(lay.input_ids(batch["tokens"], label)))
        cache = model.new_cache(3, torch.device("cpu"), torch.float32)
        flat = batch["tokens"].reshape(3, -1)
        for step in lay.generation_steps:
            hidden = model(lay.input_ids(flat, label, step.start, step.end), start=step.start, cache=cache)
            torch.testing.assert_close(model.head(hidden), full[:, step.start:step.end], rtol=0, atol=2e-5)
    assert len(lay.generation_steps) == passes
    # greedy decoding through the cache is a fixed point of the full forward's argmax
    kwargs = {"label": label} if kind == "ucf" else {"context": batch["tokens"][:, :2]}
    tokens, stats = generate(model, 3, temperature=0, **kwargs)
    assert stats["forward_passes"] == passes
    with torch.no_grad():
        predicted = model.logits({"tokens": tokens, "label": batch["label"]}).argmax(-1)
    free = ~torch.as_tensor(lay.context_mask)
    assert torch.equal(predicted[:, free], tokens.view(3, -1)[:, free])
    if kind == "k600":
        assert torch.equal(tokens[:, :2], batch["tokens"][:, :2])


def test_class_prefixes_from_a_trained_sentencepiece_model(files):
    import sentencepiece

    assert class_text("ApplyEyeMakeup") == "apply eye makeup"
    assert class_text("YoYo") == "yo yo" and class_text("TaiChi") == "tai chi"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(files["spm"]))
    prefixes, vocab = class_prefixes(CLASS_NAMES, files["spm"])
    assert vocab == sp.GetPieceSize() == files["text_vocab"]
    texts = ["apply eye makeup", "yo yo", "tai chi", "playing daf", "blowing candles in the wind at the party"]
    for ids, text in zip(prefixes, texts, strict=True):
        assert len(ids) == 8 and ids[0] == 1  # BOS first
        body = [i for i in ids[1:] if i != 2]
        assert ids[1:] == body + [2] * (7 - len(body))  # EOS only as right padding
        pieces = sp.EncodeAsIds(text)
        assert body == pieces[:7]
        if len(pieces) < 7:
            assert sp.DecodeIds(body) == text
    assert 2 not in prefixes[-1]  # the long name fills all 8 places, cut to BOS + 7 pieces
    _, cfg = load(files, "ucf")
    assert cfg.layout.class_prefixes == prefixes and cfg.layout.text_vocab_size == vocab
    saved = json.loads((files["tmp"] / "ucf" / "classes.json").read_text())
    assert saved == {n: i for i, n in enumerate(CLASS_NAMES)}


def test_refusals_name_the_file_and_the_keys(files, tmp_path):
    tmp = files["tmp"]
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n" * 20)
    with pytest.raises(CheckpointError, match="notes.ckpt: not a readable PyTorch checkpoint"):
        convert_generator(text, tmp_path / "x.safetensors")
    tokenizer_file = tmp_path / "magvit2.pt"
    torch.save({"model_state_dict": {"module.encoder_layers.0.conv.weight": torch.zeros(1)}, "version": "1"},
               tokenizer_file)
    with pytest.raises(CheckpointError, match=r"magvit2.pt: not an NBP generator checkpoint \(no state_dict"):
        convert_generator(tokenizer_file, tmp_path / "x.safetensors")

    weights = released_generator_weights("k600")
    weights["transformer.head.bias"] = torch.zeros(VIDEO_CODES)  # a head with bias: another architecture
    weights.pop("transformer.ln_f.bias")
    weights["transformer.blocks.1.mlp.2.weight"] = torch.zeros(32, 96)
    weights["other.thing"] = torch.zeros(1)
    shaped = tmp_path / "shaped.ckpt"
    torch.save({"state_dict": weights, "hyper_parameters": {"args": vars(_args("k600"))}}, shaped)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): other\.thing"):
        convert_generator(shaped, tmp_path / "x.safetensors")
    weights.pop("other.thing")
    torch.save({"state_dict": weights, "hyper_parameters": {"args": vars(_args("k600"))}}, shaped)
    with pytest.raises(CheckpointError) as err:
        convert_generator(shaped, tmp_path / "x.safetensors")
    message = str(err.value)
    assert "missing keys (1): ln_f.bias" in message and "unexpected keys (1): head.bias" in message
    assert "blocks.1.mlp.2.weight [32, 96] (expected [32, 128])" in message
    assert not (tmp_path / "x.safetensors").exists()

    with pytest.raises(CheckpointError, match="the checkpoint says n_head=4, you gave 8"):
        convert_generator(tmp / "k600.ckpt", tmp_path / "x.safetensors", n_head=8)
    with pytest.raises(ValueError, match="--llama-tokenizer"):
        convert_generator(tmp / "ucf.ckpt", tmp_path / "x.safetensors", classes=tmp / "classes.json")
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": released_generator_weights("k600")}, bare)  # no hyper_parameters
    with pytest.raises(CheckpointError, match=r"no hyper_parameters naming kind: give it \(--kind\)"):
        convert_generator(bare, tmp_path / "x.safetensors")
    cfg = convert_generator(bare, tmp_path / "bare.safetensors", kind="k600", n_head=4, block_size=BLOCK,
                            grid=list(GRID))
    assert cfg.layout.context_frames == 2 and not cfg.layout.bov


def test_pickled_checkpoints_need_an_explicit_choice(files, tmp_path):
    weights = released_generator_weights("k600")
    odd = tmp_path / "odd.ckpt"
    torch.save({"state_dict": weights, "hyper_parameters": {"args": _args("k600"), "pkeep": fractions.Fraction(1)}},
               odd)
    with pytest.raises(CheckpointError, match=r"fractions\.Fraction.*pass --trust-pickle"):
        convert_generator(odd, tmp_path / "x.safetensors")
    cfg = convert_generator(odd, tmp_path / "odd.safetensors", trust_pickle=True)
    assert cfg.model.n_layer == 2 and (tmp_path / "odd.safetensors").is_file()


def _args(kind):
    from official_fixtures import released_args

    return released_args(kind)


@pytest.mark.slow
def test_cli_conversion_then_sampling_with_the_official_tokenizer(files, tmp_path):
    """nbp-convert-official and nbp-sample --paper-sampling with a tokenizer in the released layout."""
    from official_fixtures import write_tokenizer_pt
    from video_fixtures import lavfi_video

    from nbp_ds.tokenizer.official import OfficialTokenizer

    tmp = files["tmp"]
    big = tmp_path / "k600_64k.ckpt"  # the released 64,000 codes, so the official tokenizer fits the model
    weights = released_generator_weights("k600", video_codes=64_000)
    torch.save({"state_dict": weights, "hyper_parameters": {"args": _args("k600")}}, big)
    out = tmp_path / "converted" / "k600.safetensors"
    result = subprocess.run([sys.executable, "-m", "nbp_ds.cli.convert_official", "generator", str(big), str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.manual_seed(0)
    write_tokenizer_pt(tmp_path / "magvit2_k600.pt", OfficialTokenizer(32).state_dict())
    clip = lavfi_video(tmp_path / "clip.mp4", size="40x32", seconds=2.0)
    result = subprocess.run([sys.executable, "-m", "nbp_ds.cli.sample", "--weights", str(out), "--tokenizer",
                             f"official:{tmp_path / 'magvit2_k600.pt'}", "--context", str(clip), "--num", "2",
                             "--paper-sampling", "--out", str(tmp_path / "samples"), "--device", "cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 forward passes per video" in result.stdout
    assert len(list((tmp_path / "samples").glob("*.mp4"))) == 2
    refused = subprocess.run([sys.executable, "-m", "nbp_ds.cli.convert_official", "generator", str(tmp / "ucf.ckpt"),
                              str(tmp_path / "ucf.safetensors"), "--classes", str(tmp / "classes.json")],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--llama-tokenizer" in refused.stderr


@pytest.mark.skipif(not all(map(ffmpeg_tools.find_tool, ffmpeg_tools.TOOLS)),
                    reason=f"needs ffmpeg and ffprobe: {ffmpeg_tools.INSTALL_HINT}")
@pytest.mark.parametrize("kind", ["ucf", "k600"])
def test_nbp_sample_frames_129_from_the_command_line_with_converted_releases(files, tmp_path, kind):
    """`nbp-sample --frames 129` run as a program on the converted released generators (learned positions: each
    window recomputed): UCF-101 class-conditional with its text prefix and hybrid first frame, Kinetics-600 frame
    prediction continuing a video. 43x the 3-latent-frame clip: 33 latent frames, 129 frames in the mp4 (counted by
    ffprobe) and in the frames array; sampling.json records recompute and the sink frame."""
    from video_fixtures import lavfi_video

    from nbp_ds.tokenizer.model import TokenizerConfig, VideoTokenizer

    # a tokenizer with the fixture's 64 video codes (FSQ 4x4x4), 4x smaller in space: 9x16x16 clips <-> 3x4x4 tokens
    torch.manual_seed(0)
    VideoTokenizer(TokenizerConfig("codes64", [4, 4, 4], 8, [1, 2, 2], 1, patch_size=2, spatial_downsample=1,
                                   temporal_kernel=1)).save(tmp_path / "tok")
    condition = (["--label", "1"] if kind == "ucf"
                 else ["--context", str(lavfi_video(tmp_path / "clip.mp4", size="16x16", seconds=2.0))])
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "nbp_ds.cli.sample", "--weights",
                             str(files["tmp"] / kind / "model.safetensors"), "--tokenizer", str(tmp_path / "tok"),
                             "--out", str(out), "--frames", "129", *condition, "--device", "cpu", "--writers", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    stem = "YoYo_000" if kind == "ucf" else "sample_000"  # UCF: named by the classes.json the conversion wrote
    assert sorted(p.stem for p in out.glob("*.mp4")) == [stem]
    probe = subprocess.run([ffmpeg_tools.ffprobe(), "-v", "error", "-count_frames", "-select_streams", "v:0",
                            "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", str(out / f"{stem}.mp4")],
                           capture_output=True, text=True, timeout=60)
    assert int(probe.stdout.strip()) == 129, probe.stderr
    assert np.load(out / "frames" / f"{stem}.npy").shape == (129, 16, 16, 3)
    tokens = np.load(out / "tokens" / f"{stem}.npy")
    assert tokens.shape == (33, *GRID[1:]) and 0 <= tokens.min() and tokens.max() < VIDEO_CODES
    settings = json.loads((out / "sampling.json").read_text())
    assert settings["long"] == {"latent_frames": 33, "long_mode": "recompute", "sink_frames": 1}


def test_cfg_and_label_dropout_are_refused_with_text_prefixes(files):
    model, cfg = load(files, "ucf")
    with pytest.raises(ValueError, match="cfg_scale= needs a null class"):
        generate(model, 1, label=0, cfg_scale=2.0)
    data = cfg.to_dict()
    data["model"]["class_dropout"] = 0.1
    from nbp_ds.config import RunConfig

    with pytest.raises(ConfigError, match="model.class_dropout=0.1 needs a null class"):
        RunConfig.from_dict(data)
