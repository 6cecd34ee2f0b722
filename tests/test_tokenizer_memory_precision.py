"""The tokenizer trainer's memory and precision settings: train.activation_checkpointing recomputes each layer in
backward and leaves the gradients as they were; under bf16 autocast the latents are quantized in float32;
train.precision is checked by name and bf16 needs a CUDA device."""

from __future__ import annotations

import pytest
import torch
from video_fixtures import dataset

from nbp_ds.errors import ConfigError
from nbp_ds.tokenizer import build_tokenizer
from nbp_ds.tokenizer.config import load_tokenizer_config
from nbp_ds.tokenizer.official import OfficialTokenizer


def tokenizers():
    torch.manual_seed(0)
    return [build_tokenizer("tiny", seed=0), OfficialTokenizer(width=32)]


def clip_for(model) -> torch.Tensor:
    """A random clip [1, 3, 1 + f, 2s, 2s] in [-1, 1] of the smallest shape the tokenizer takes twice over."""
    torch.manual_seed(1)
    frames, side = 1 + model.temporal_factor, 2 * model.spatial_factor
    return torch.rand(1, 3, frames, side, side) * 2 - 1


def count_calls(model) -> list[int]:
    """A list that grows by one each time the encoder's second layer runs (its forward wrapped: the module's
    forward hooks do not fire when checkpointing recomputes it)."""
    layer = (model.encoder.blocks if hasattr(model, "encoder") else model.encoder_layers)[1]
    calls, forward = [], layer.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    layer.forward = counted
    return calls


def gradients_and_calls(model, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    """The gradients of a reconstruction loss, and how many times the encoder's second layer ran for it."""
    calls = count_calls(model)
    model.zero_grad(set_to_none=True)
    recon, _ = model(x)
    (recon - x).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)


@pytest.mark.parametrize("index", [0, 1], ids=["nbp_ds", "official"])
def test_activation_checkpointing_recomputes_each_layer_and_keeps_the_gradients(index):
    model = tokenizers()[index].train()
    x = clip_for(model)
    plain, plain_calls = gradients_and_calls(model, x)
    model.activation_checkpointing = True
    recomputed, recomputed_calls = gradients_and_calls(model, x)
    # once forward, once more in backward (a layer whose activations were not kept)
    assert (plain_calls, recomputed_calls) == (1, 2)
    assert plain.keys() == recomputed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    model = tokenizers()[index].train()
    model.activation_checkpointing = True
    calls = count_calls(model)
    with torch.no_grad():  # no gradients, nothing to recompute: each layer runs once
        model(x)
    assert len(calls) == 1


@pytest.mark.parametrize("index", [0, 1], ids=["nbp_ds", "official"])
def test_latents_are_quantized_in_float32_under_bf16_autocast(index):
    model = tokenizers()[index].eval()
    seen = []
    model.fsq.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(clip_for(model))
    assert seen == [torch.float32]  # the encoder computed in bf16; rounding bf16 latents would move codes


def test_precision_is_refused_by_name_and_bf16_needs_a_cuda_device(tmp_path):
    with pytest.raises(ConfigError, match=r"train.precision must be one of fp32, bf16, got 'fp16'"):
        load_tokenizer_config(None, ["data.videos=v", "train.out_dir=o", "train.precision=fp16"])
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: bf16 is allowed (the gpu test trains with it)")
    from nbp_ds.tokenizer.trainer import TokenizerTrainer

    cfg = load_tokenizer_config(None, [f"data.videos={tmp_path / 'v'}", f"train.out_dir={tmp_path / 'run'}",
                                       "train.precision=bf16", "train.device=cpu"])
    with pytest.raises(ConfigError, match="train.precision=bf16 needs a CUDA device; this run is on cpu"):
        TokenizerTrainer(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.gpu
def test_bf16_and_activation_checkpointing_train_on_a_gpu(tmp_path):
    from nbp_ds.tokenizer.trainer import train_tokenizer

    videos = dataset(tmp_path / "videos", classes=2, per_class=3)
    cfg = load_tokenizer_config(None, [f"data.videos={videos}", f"train.out_dir={tmp_path / 'run'}",
                                       "model.preset=tiny", "data.clip.frames=9", "data.clip.resolution=32",
                                       "train.steps=4", "train.batch_size=2", "train.device=cuda",
                                       "train.precision=bf16", "train.activation_checkpointing=true",
                                       "loss.adversarial_weight=0.1", "loss.adversarial_start=0.5"])
    report = train_tokenizer(cfg)
    assert report is not None and torch.isfinite(torch.tensor(report["psnr"]))
