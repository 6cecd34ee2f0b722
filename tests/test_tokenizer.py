"""The causal 3D CNN + FSQ tokenizer: shapes, causality, code range, FSQ bijection, save/load."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from nbp_ds.tokenizer import PRESETS, TokenizerConfig, VideoTokenizer, build_tokenizer, load_tokenizer
from nbp_ds.tokenizer.fsq import FSQ
from nbp_ds.tokenizer.model import spread_over_tokens, token_means


@pytest.fixture(scope="module")
def tiny():
    return build_tokenizer("tiny", seed=0).eval()


def test_presets_shapes_and_codebooks():
    assert build_tokenizer("tiny").latent_shape(9, 32, 32) == (3, 8, 8)
    paper = build_tokenizer("paper")
    assert paper.latent_shape(17, 128, 128) == (5, 16, 16) and paper.codebook_size == 64_000
    assert PRESETS["small"].spatial_factor == 8 and build_tokenizer("small").codebook_size == 1000


def test_encode_decode_round_trip_shapes_and_range(tiny):
    video = torch.randint(0, 256, (2, 9, 32, 32, 3), dtype=torch.uint8)
    tokens = tiny.encode(video)
    assert tokens.shape == (2, 3, 8, 8) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() < tiny.codebook_size
    back = tiny.decode(tokens)
    assert back.shape == video.shape and back.dtype == torch.uint8
    small = build_tokenizer("small")
    assert small.decode(small.encode(torch.zeros(1, 17, 32, 32, 3, dtype=torch.uint8))).shape == (1, 17, 32, 32, 3)


# tiny's (2+1)D convs, the full 3D ones of small/paper, and the linear path of the quickstart's tokenizer
@pytest.mark.parametrize("temporal_kernel,linear_skip", [(1, False), (3, False), (1, True)])
def test_time_causality_of_encoder_and_decoder(temporal_kernel, linear_skip):
    cfg = TokenizerConfig(**{**asdict(PRESETS["tiny"]), "temporal_kernel": temporal_kernel, "linear_skip": linear_skip})
    torch.manual_seed(0)
    tiny = VideoTokenizer(cfg).eval()
    x = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    z = tiny.encoder(x)
    for t_latent, first_free_frame in ((0, 1), (1, 5)):  # latent t sees frames <= 4t
        y = x.clone()
        y[:, :, first_free_frame:] = torch.rand_like(y[:, :, first_free_frame:])
        assert torch.equal(tiny.encoder(y)[:, :, : t_latent + 1], z[:, :, : t_latent + 1])
        assert not torch.equal(tiny.encoder(y)[:, :, t_latent + 1], z[:, :, t_latent + 1])
    tokens = tiny.encode(torch.randint(0, 256, (1, 9, 32, 32, 3), dtype=torch.uint8))
    other = tokens.clone()
    other[:, 1:] = (other[:, 1:] + 1) % tiny.codebook_size
    a, b = tiny.decode(tokens), tiny.decode(other)
    assert torch.equal(a[:, 0], b[:, 0]) and not torch.equal(a[:, 1:], b[:, 1:])  # frame 0 from latent 0 alone


def test_token_means_average_the_pixels_each_token_covers_and_spread_undoes_them():
    x = torch.rand(2, 3, 9, 8, 12, generator=torch.Generator().manual_seed(0))
    frames_of_token = [[0], [1, 2, 3, 4], [5, 6, 7, 8]]  # the causal grouping: the first frame alone, then 4 each
    expected = np.zeros((2, 3, 3, 2, 3))
    for t, frames in enumerate(frames_of_token):
        for i in range(2):
            for j in range(3):
                expected[:, :, t, i, j] = x[:, :, frames, 4 * i:4 * i + 4, 4 * j:4 * j + 4].numpy().mean(axis=(2, 3, 4))
    means = token_means(x, temporal=4, spatial=4)
    assert np.allclose(means.numpy(), expected, atol=1e-6)
    spread = spread_over_tokens(means, temporal=4, spatial=4)
    assert spread.shape == x.shape
    assert torch.equal(spread[:, :, 5, 7, 11], means[:, :, 2, 1, 2])  # frame 5 is token 2's first
    assert torch.equal(spread[:, :, 0, 3, 3], means[:, :, 0, 0, 0])
    assert torch.allclose(token_means(spread, 4, 4), means)


def test_linear_skip_is_off_in_configs_saved_before_it(tmp_path):
    """A tokenizer saved before the linear path existed (its config.json has no linear_skip key) loads as it was."""
    folder = build_tokenizer("tiny", seed=1).save(tmp_path / "tok")
    saved = json.loads((folder / "config.json").read_text())
    del saved["linear_skip"]
    (folder / "config.json").write_text(json.dumps(saved))
    loaded = load_tokenizer(folder)
    assert loaded.config.linear_skip is False and loaded.encoder.linear_skip is None
    video = torch.randint(0, 256, (1, 9, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.encode(video), load_tokenizer("random:tiny:1").encode(video))


def test_fsq_codes_are_a_bijection():
    fsq = FSQ([3, 4, 5])
    assert fsq.codebook_size == 60
    quantized, indices = fsq(torch.randn(20000, 3, generator=torch.Generator().manual_seed(0)) * 2)
    assert sorted(set(indices.tolist())) == list(range(60))  # every code is reachable
    assert torch.allclose(fsq.indices_to_values(indices), quantized)  # and decodes to its own values
    assert len({tuple(v) for v in fsq.indices_to_values(torch.arange(60)).tolist()}) == 60  # distinct values
    z = torch.randn(1000, 3, requires_grad=True)
    q, idx = fsq(z)
    q.sum().backward()  # straight-through: gradients reach the encoder output
    assert z.grad.abs().sum() > 0 and 0 <= idx.min() and idx.max() < 60
    with pytest.raises(ValueError, match=r"\[0, 60\)"):
        fsq.indices_to_values(torch.tensor([60]))


def test_loading_a_saved_tokenizer_draws_nothing_from_the_global_generator(tmp_path):
    """A training run's sample hook loads its tokenizer between steps: building the layers (whose initial weights the
    file then replaces) must not move the stream that class dropout and the data draw from."""
    build_tokenizer("tiny", seed=2).save(tmp_path / "tok")
    torch.manual_seed(123)
    expected = torch.rand(4)  # what the stream gives next when nothing else draws from it
    torch.manual_seed(123)
    load_tokenizer(tmp_path / "tok")
    assert torch.equal(torch.rand(4), expected)


def test_save_load_and_errors(tiny, tmp_path):
    video = torch.randint(0, 256, (1, 9, 32, 32, 3), dtype=torch.uint8)
    build_tokenizer("tiny", seed=3).save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.version != "untrained" and len(loaded.version) == 12 and loaded.name == "tiny"
    assert torch.equal(loaded.encode(video), load_tokenizer("random:tiny:3").encode(video))
    assert not torch.equal(loaded.encode(video), tiny.encode(video))
    run_folder = build_tokenizer("tiny", 3).save(tmp_path / "run" / "tokenizer").parent
    assert load_tokenizer(run_folder).version == loaded.version
    with pytest.raises(FileNotFoundError, match="nowhere: expected a folder with config.json"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown tokenizer preset 'huge'"):
        load_tokenizer("random:huge")
    with pytest.raises(ValueError, match="clips need 1 \\+ 4k frames"):
        tiny.encode(torch.zeros(1, 8, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of 4"):
        tiny.encode(torch.zeros(1, 9, 30, 30, 3, dtype=torch.uint8))
