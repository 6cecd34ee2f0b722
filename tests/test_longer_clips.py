"""Training on longer clips: 33- and 65-frame clips (9 and 17 latent frames) tokenized and trained with the presets
unchanged in form, and a model trained on 17-frame clips fine-tuned on longer ones from its export
(train.init_from)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from train_helpers import ROOT, env, step_losses
from video_fixtures import lavfi_video

from nbp_ds.config import load_config
from nbp_ds.data import build_loader
from nbp_ds.errors import ConfigError
from nbp_ds.model import build_model
from nbp_ds.train.init_weights import load_initial_weights
from nbp_ds.weights.export import save_export

SHORT, LONG = [3, 4, 4], [7, 4, 4]  # tiny's 3 latent frames, and more than twice as many


def _export(cfg, path):
    torch.manual_seed(0)
    model = build_model(cfg)
    save_export({k: v.detach() for k, v in model.state_dict().items()}, cfg, path)
    return model


def test_finetuning_on_longer_clips_keeps_what_the_short_model_computes(tmp_path):
    """A RoPE model exported at 3 latent frames loads into the 7-frame model unchanged; there, every token of the
    first 3 frames gets the short model's logits (block-causal attention: it sees the same earlier tokens at the
    same (t, h, w)); frames 3-6 sit at rotary positions t the short model never used: new rotations, same weights."""
    short_cfg = load_config("tiny", ["model.attention=sdpa", "model.class_dropout=0", f"layout.grid={SHORT}"])
    short = _export(short_cfg, tmp_path / "short.safetensors").eval()
    long_cfg = load_config("tiny", ["model.attention=sdpa", "model.class_dropout=0", f"layout.grid={LONG}"])
    torch.manual_seed(1)  # other initial weights, which the load must replace
    long = build_model(long_cfg).eval()
    load_initial_weights(long, tmp_path / "short.safetensors", long_cfg)
    for (name, a), b in zip(short.state_dict().items(), long.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, long_cfg.model.vocab_size, (4, *LONG), generator=gen)
    label = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        long_logits = long.logits({"tokens": tokens, "label": label})
        short_logits = short.logits({"tokens": tokens[:, :SHORT[0]], "label": label})
    first = short_logits.shape[1]  # 3 x 4 x 4 tokens, raster order
    torch.testing.assert_close(long_logits[:, :first], short_logits, rtol=1e-5, atol=1e-5)
    # the later frames do depend on their own (new) positions: not a copy of the first frames' logits
    assert not torch.allclose(long_logits[:, first:2 * first], short_logits, atol=1e-3)


def test_finetuning_on_another_frame_size_or_with_learned_positions_is_refused(tmp_path):
    _export(load_config("tiny", [f"layout.grid={SHORT}"]), tmp_path / "short.safetensors")
    other_size = load_config("tiny", ["layout.grid=[3,8,8]"])
    with pytest.raises(ConfigError, match=r"layout.grid: \[3, 4, 4\] -> \[3, 8, 8\]"):
        load_initial_weights(build_model(other_size), tmp_path / "short.safetensors", other_size)
    _export(load_config("tiny", ["model.arch=gpt2"]), tmp_path / "gpt2.safetensors")
    longer_gpt2 = load_config("tiny", ["model.arch=gpt2", f"layout.grid={LONG}"])
    with pytest.raises(ConfigError, match=r"needs rotary positions \(model.arch=llama\); model.arch=gpt2"):
        load_initial_weights(build_model(longer_gpt2), tmp_path / "gpt2.safetensors", longer_gpt2)


@pytest.mark.parametrize("preset", ["ucf101-700m", "k600-700m"])
def test_presets_take_9_and_17_latent_frames_with_the_same_weights(preset):
    """The paper's presets at 17, 33 and 65 frames: the same parameter names and shapes (a checkpoint of one loads
    into the others), a sequence of 1 + 4k blocks more, rotary positions t up to the last latent frame."""
    shapes, lengths = [], []
    for frames in (5, 9, 17):
        cfg = load_config(preset, [f"layout.grid=[{frames},16,16]"])
        model = build_model(cfg, device="meta")  # no memory: the shapes only
        shapes.append({k: tuple(v.shape) for k, v in model.state_dict().items()})
        lengths.append(model.layout.seq_len)
        assert model.layout.positions[:, 0].max() == frames - 1
    assert shapes[0] == shapes[1] == shapes[2]
    assert lengths[1] - lengths[0] == lengths[2] - lengths[1] - 4 * 256 == 4 * 256  # 256 tokens per latent frame


def _tokenize(videos, out, frames: int) -> None:
    cmd = [sys.executable, "-m", "nbp_ds.cli.tokenize", "--videos", str(videos), "--out", str(out), "--frames",
           str(frames), "--resolution", "32", "--fps", "8", "--tokenizer", "random:tiny", "--clips-per-video", "1",
           "--no-progress"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env())
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_tokenize_and_finetune_at_33_and_65_frames(tmp_path):
    """nbp-tokenize at 33 and 65 frames gives 9 and 17 latent frames per clip (random:tiny: 4x spatial); the
    tiny preset with layout.grid set to them trains one step from the export of a model for 17-frame clips."""
    for c in range(2):
        lavfi_video(tmp_path / "videos" / f"class{c}" / "v.mp4", size="48x48", seconds=9.0,
                    source=("testsrc", "smptebars")[c])
    # 17 frames at 32x32, for random:tiny's 1000 codes
    short_cfg = load_config("tiny", ["layout.grid=[5,8,8]", "model.vocab_size=1000"])
    _export(short_cfg, tmp_path / "short17.safetensors")
    for frames, latent in ((33, 9), (65, 17)):
        shards = tmp_path / f"shards{frames}"
        _tokenize(tmp_path / "videos", shards, frames)
        loader = build_loader(str(shards), grid=(latent, 8, 8), batch_size=2, mode="val", rank=0, world_size=1,
                              num_workers=0, seed=0)
        batch = next(iter(loader))
        assert tuple(batch["tokens"].shape) == (2, latent, 8, 8)
        assert np.ptp(batch["tokens"].numpy()) > 0
        out = tmp_path / f"run{frames}"
        cmd = [sys.executable, "-m", "nbp_ds.train", "--config", "tiny", f"layout.grid=[{latent},8,8]",
               "model.vocab_size=1000",
               f"data.train={shards}", f"train.out_dir={out}", "train.steps=1", "train.micro_batch=2",
               "train.save_every=1", "train.eval_every=0", "data.num_workers=0", "model.attention=sdpa",
               f"train.init_from={tmp_path / 'short17.safetensors'}"]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env())
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert f"fine-tuning on {latent} latent frames from weights trained on 5" in result.stderr
        assert np.isfinite(step_losses(out)[1])
        assert (out / "checkpoints" / "latest").read_text() == "step00000001"
