"""The port of the authors' released tokenizer: their file layout, structure, FSQ codes, causality, refusals."""

from __future__ import annotations

import fractions
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from official_fixtures import write_tokenizer_pt
from video_fixtures import lavfi_video

from nbp_ds.errors import CheckpointError
from nbp_ds.tokenizer import load_tokenizer
from nbp_ds.tokenizer.fsq import FSQ
from nbp_ds.tokenizer.official import DepthToSpace3d, OfficialTokenizer, load_official_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 32  # the released 128 scaled down; GroupNorm keeps its 32 groups


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tokenizer file in the released layout (module. prefix, model_state_dict) with random weights."""
    torch.manual_seed(0)
    model = OfficialTokenizer(WIDTH)
    with torch.no_grad():  # spread the random weights so the FSQ codes vary
        for name, p in model.named_parameters():
            if name.endswith("beta"):
                p.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("tok") / "magvit2_test.pt"
    write_tokenizer_pt(path, model.state_dict())
    return path, model


def test_structure_is_the_released_one():
    """Shapes the authors' description fixes, at the released width (built on the meta device: no memory)."""
    with torch.device("meta"):
        tok = OfficialTokenizer()
    shapes = {k: tuple(v.shape) for k, v in tok.state_dict().items()}
    assert sum(v.numel() for v in tok.parameters()) == 370_372_105  # "370M parameters each"
    assert shapes["encoder_layers.0.conv.weight"] == (128, 3, 3, 3, 3)
    assert shapes["encoder_layers.5.conv.weight"] == (128, 128, 3, 3, 3)  # stride (1,2,2)
    assert shapes["encoder_layers.6.residual_fn.0.conv.weight"] == (256, 128, 1, 1, 1)  # unit 128 -> 256
    assert shapes["encoder_layers.16.fn.5.conv.weight"] == (512, 512, 3, 3, 3)  # unit 256 -> 512
    assert shapes["encoder_layers.24.weight"] == (512,) and shapes["encoder_layers.25.beta"] == (1, 512, 1, 1, 1)
    assert shapes["encoder_layers.26.weight"] == (6, 512, 1, 1, 1)
    assert shapes["decoder_layers.0.conv.weight"] == (512, 6, 3, 3, 3)
    assert shapes["decoder_layers.9.conv.weight"] == (4096, 512, 3, 3, 3)  # then depth-to-space (2,2,2)
    assert shapes["decoder_layers.15.conv.weight"] == (2048, 256, 3, 3, 3)
    assert shapes["decoder_layers.21.conv.weight"] == (1024, 256, 3, 3, 3)  # then depth-to-space (1,2,2)
    assert shapes["decoder_layers.29.conv.weight"] == (3, 128, 3, 3, 3)
    assert not any(k.startswith(("decoder_layers.10.", "decoder_layers.16.", "decoder_layers.22.")) for k in shapes)
    assert tok.encoder_layers[5].conv.stride == (1, 2, 2) and tok.encoder_layers[10].conv.stride == (2, 2, 2)
    assert tok.latent_shape(17, 128, 128) == (5, 16, 16) and tok.codebook_size == 64_000


def test_released_file_loads_key_for_key(released):
    path, model = released
    tok = load_tokenizer(f"official:{path}")
    assert tok.name == "official-magvit2_test" and len(tok.version) == 12
    loaded = tok.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    video = torch.randint(0, 256, (2, 9, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    codes = tok.encode(video)
    assert codes.shape == (2, 3, 4, 4) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < 64_000 and codes.unique().numel() > 4
    frames = tok.decode(codes)
    assert frames.shape == video.shape and frames.dtype == torch.uint8
    with pytest.raises(ValueError, match=r"clips need 1 \+ 4k frames"):
        tok.encode(video[:, :8])
    with pytest.raises(ValueError, match="multiple of 8"):
        tok.encode(video[:, :, :28, :28])


def test_fsq_index_formula_and_inverse_by_hand():
    """index = sum_d (code_d * half_d + half_d) * basis_d, basis [1,8,64,512,2560,12800], channel 0 lowest."""
    fsq = FSQ([8, 8, 8, 5, 5, 5])
    # rounded values per channel (code_d * half_d), half = [4,4,4,2,2,2]
    cases = {
        (-4, -4, -4, -2, -2, -2): 0,
        (3, 3, 3, 2, 2, 2): 63_999,
        (-3, -4, -4, -2, -2, -2): 1,  # channel 0 is the least significant digit
        (-4, -4, -4, -2, -2, -1): 12_800,  # channel 5 the most
        (-4, 3, 0, -2, 2, 1): 0 * 1 + 7 * 8 + 4 * 64 + 0 * 512 + 4 * 2560 + 3 * 12800,  # = 48,952
    }
    levels = torch.tensor([8, 8, 8, 5, 5, 5], dtype=torch.float64)
    half_l = (levels - 1) * 1.001 / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)
    for rounded, index in cases.items():
        # the encoder output whose bounded value is exactly `rounded`: the inverse of tanh(z + shift) * half_l - offset
        target = torch.tensor(rounded, dtype=torch.float64)
        z = torch.atanh((target + offset) / half_l) - torch.atanh(offset / half_l)
        values, got = fsq(z.float().unsqueeze(0))
        assert int(got) == index, rounded
        half = torch.tensor([4, 4, 4, 2, 2, 2.0])
        assert torch.equal(values[0], target.float() / half)
        assert torch.equal(fsq.indices_to_values(torch.tensor([index]))[0], target.float() / half)
    assert index == 48_952


# ---- the released quantizer, written out from the FSQ paper's reference code (appendix A.1) ----------------
RELEASED_LEVELS = np.array([8, 8, 8, 5, 5, 5])
RELEASED_BASIS = np.array([1, 8, 64, 512, 2560, 12800])


def released_bound(z: np.ndarray, dtype=np.float32, eps_sign: float = -1.0, shift_fn=np.tan) -> np.ndarray:
    """tanh(z + shift) * half_l - offset with half_l = (L - 1)(1 - eps)/2, offset 1/2 for even L,
    shift = tan(offset / half_l); in float32 as the authors compute. eps_sign and shift_fn give the variants
    the test must tell apart (the project's own FSQ: +eps and atanh)."""
    levels = RELEASED_LEVELS.astype(dtype)
    half_l = (levels - 1) * (1 + dtype(eps_sign) * dtype(1e-3)) / 2
    offset = np.where(RELEASED_LEVELS % 2 == 0, 0.5, 0.0).astype(dtype)
    shift = shift_fn(offset / half_l).astype(dtype)
    return np.tanh(z.astype(dtype) + shift) * half_l - offset


def released_codes(z: np.ndarray, **variant) -> np.ndarray:
    rounded = np.round(released_bound(z, **variant))
    return ((rounded + RELEASED_LEVELS // 2) * RELEASED_BASIS).sum(-1).astype(np.int64)


def latents_either_side_of_each_rounding_boundary(step: float = 1.5e-6) -> np.ndarray:
    """float32 latents [N, 6]: for every channel and every boundary k + 1/2 between two of its values, the latent
    whose released bound is exactly the boundary (float64 inverse), moved `step` down and up; other channels 0.
    The step is above float32 noise (~5e-7 here) and below the gap to either wrong variant (atanh instead of tan
    shifts an even channel by ~4e-6; the other eps sign moves the bound by up to 3.5e-3)."""
    rows = []
    for d, level in enumerate(RELEASED_LEVELS):
        half_l = (level - 1) * (1 - 1e-3) / 2
        offset = 0.5 if level % 2 == 0 else 0.0
        for k in range(-(level // 2), level - level // 2 - 1):
            at = np.arctanh((k + 0.5 + offset) / half_l) - np.tan(offset / half_l)
            for side in (-step, step):
                row = np.zeros(6)
                row[d] = at + side
                rows.append(row)
    return np.array(rows, dtype=np.float32)


def test_released_quantizer_matches_the_reference_formula_at_rounding_boundaries(released):
    path, _ = released
    quantizer = load_tokenizer(f"official:{path}").fsq
    z = latents_either_side_of_each_rounding_boundary()
    expected = released_codes(z)
    # the margins hold: float64 agrees with float32, and each side of a boundary rounds to a different code
    assert np.array_equal(released_codes(z, dtype=np.float64), expected)
    assert np.all(expected[0::2] != expected[1::2])
    # and the rows tell the variants apart: one eps sign, or atanh for tan, changes codes
    assert np.any(released_codes(z, eps_sign=1.0) != expected)
    assert np.any(released_codes(z, shift_fn=np.arctanh) != expected)
    values, codes = quantizer(torch.from_numpy(z))
    assert codes.tolist() == expected.tolist()
    half = RELEASED_LEVELS // 2
    assert np.array_equal(values.numpy(), (np.round(released_bound(z)) / half).astype(np.float32))
    spread = np.random.default_rng(0).normal(0, 2, (20_000, 6)).astype(np.float32)
    assert quantizer(torch.from_numpy(spread))[1].tolist() == released_codes(spread).tolist()


def test_released_tokenizer_encodes_with_the_released_quantizer(released):
    path, _ = released
    tok = load_tokenizer(f"official:{path}")
    video = torch.randint(0, 256, (2, 9, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        latents = tok.video_to_latents(video).permute(0, 2, 3, 4, 1).numpy()
    assert tok.encode(video).numpy().tolist() == released_codes(latents).tolist()


def test_depth_to_space_channel_order_by_hand():
    """Input channel ((tb * bh + hb) * bw + wb) * C + c goes to offset (tb, hb, wb); the first frame is dropped."""
    x = torch.zeros(1, 8, 2, 1, 1)
    x[0, :, 0, 0, 0] = torch.arange(8.0)  # latent frame 0: values k
    x[0, :, 1, 0, 0] = 10 + torch.arange(8.0)  # latent frame 1: values 10 + k
    y = DepthToSpace3d((2, 2, 2))(x)
    expected = torch.tensor([[[4.0, 5.0], [6.0, 7.0]],  # frame 0 <- latent 0, tb = 1 (tb = 0 dropped)
                             [[10.0, 11.0], [12.0, 13.0]],  # frame 1 <- latent 1, tb = 0
                             [[14.0, 15.0], [16.0, 17.0]]])  # frame 2 <- latent 1, tb = 1
    assert torch.equal(y[0, 0], expected)
    two = torch.arange(8.0).reshape(1, 8, 1, 1, 1)  # C = 2, block (1, 2, 2): channel (hb * 2 + wb) * 2 + c
    assert DepthToSpace3d((1, 2, 2))(two)[0, :, 0].tolist() == [[[0.0, 2.0], [4.0, 6.0]], [[1.0, 3.0], [5.0, 7.0]]]


def test_encoder_and_decoder_are_causal_in_time(released):
    _, model = released
    model.eval()
    x = torch.rand(1, 3, 9, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z = model.encode_latents(x)
        for t_latent, first_free in ((0, 1), (1, 5)):  # latent t sees frames <= 4t
            y = x.clone()
            y[:, :, first_free:] = torch.rand_like(y[:, :, first_free:])
            changed = model.encode_latents(y)
            assert torch.equal(changed[:, :, : t_latent + 1], z[:, :, : t_latent + 1])
            assert not torch.equal(changed[:, :, t_latent + 1], z[:, :, t_latent + 1])
        values = torch.rand(1, 6, 3, 2, 2) * 2 - 1
        out = model.decode_values(values)
        later = values.clone()
        later[:, :, 2] = -later[:, :, 2]
        other = model.decode_values(later)
        assert out.shape == (1, 3, 9, 16, 16)
        assert torch.equal(out[:, :, :5], other[:, :, :5]) and not torch.equal(out[:, :, 5:], other[:, :, 5:])


def test_replicate_padding_keeps_a_constant_video_constant(released):
    """Replicate padding in time and space: a video of one colour gives the same latent everywhere (zero
    padding would change the borders and the first frames)."""
    _, model = released
    x = torch.ones(1, 3, 9, 16, 16) * torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1, 1)
    with torch.no_grad():
        z = model.encode_latents(x)
    torch.testing.assert_close(z, z[:, :, :1, :1, :1].expand_as(z), rtol=0, atol=1e-5)
    assert float(z.abs().max()) > 0.1


def test_refuses_other_files_naming_the_keys(released, tmp_path):
    path, model = released
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n" * 20)
    with pytest.raises(CheckpointError, match="notes.pt: not a readable PyTorch checkpoint"):
        load_tokenizer(f"official:{text}")
    generator = tmp_path / "gen.pt"
    torch.save({"state_dict": {"transformer.head.weight": torch.zeros(2, 2)}}, generator)
    with pytest.raises(CheckpointError, match=r"not an NBP tokenizer file \(expected a dict with 'model_state_dict'"):
        load_tokenizer(f"official:{generator}")
    state = dict(model.state_dict())
    state.pop("decoder_layers.28.beta")
    state["decoder_layers.30.conv.weight"] = torch.zeros(3, 3, 1, 1, 1)
    state["encoder_layers.26.weight"] = torch.zeros(8, 4 * WIDTH, 1, 1, 1)  # 8 latent channels, not 6
    other = tmp_path / "other.pt"
    write_tokenizer_pt(other, state)
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(f"official:{other}")
    message = str(err.value)
    assert "missing keys (1): decoder_layers.28.beta" in message
    assert "unexpected keys (1): decoder_layers.30.conv.weight" in message
    assert "encoder_layers.26.weight [8, 128, 1, 1, 1] (expected [6, 128, 1, 1, 1])" in message


def test_pickled_objects_need_trust_and_a_safetensors_copy_needs_none(released, tmp_path):
    path, model = released
    pickled = tmp_path / "pickled.pt"
    torch.save({"model_state_dict": {"module." + k: v for k, v in model.state_dict().items()},
                "config": fractions.Fraction(1, 3)}, pickled)  # an object weights_only refuses
    with pytest.raises(CheckpointError, match=r"pickles the Python object fractions\.Fraction.*nbp-convert-official"):
        load_tokenizer(f"official:{pickled}")
    trusted = load_official_tokenizer(pickled, trust_pickle=True)
    copy = tmp_path / "copy.safetensors"
    result = subprocess.run([sys.executable, "-m", "nbp_ds.cli.convert_official", "tokenizer", str(pickled), str(copy),
                             "--trust-pickle"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    again = load_tokenizer(f"official:{copy}")
    assert again.version == trusted.version == load_tokenizer(f"official:{path}").version
    video = torch.randint(0, 256, (1, 5, 16, 16, 3), dtype=torch.uint8)
    assert torch.equal(again.encode(video), trusted.encode(video))
    refused = subprocess.run([sys.executable, "-m", "nbp_ds.cli.convert_official", "tokenizer", str(pickled),
                              str(tmp_path / "no.safetensors")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "fractions.Fraction" in refused.stderr
    assert not (tmp_path / "no.safetensors").exists()


def test_tokenize_videos_tool_takes_the_official_tokenizer(released, tmp_path):
    path, _ = released
    for i in range(2):
        lavfi_video(tmp_path / "videos" / "Archery" / f"v{i}.mp4", size="48x40", seconds=2.0)
    result = subprocess.run([sys.executable, "-m", "nbp_ds.cli.tokenize", "--videos", str(tmp_path / "videos"),
                             "--out", str(tmp_path / "shards"), "--tokenizer", f"official:{path}", "--frames", "9",
                             "--resolution", "32", "--workers", "0", "--no-progress"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    from nbp_ds.data import build_loader

    batch = next(iter(build_loader(tmp_path / "shards", grid=(3, 4, 4), batch_size=2, mode="val", rank=0,
                                   world_size=1, num_workers=0)))
    assert batch["tokens"].shape == (2, 3, 4, 4) and int(batch["tokens"].max()) < 64_000
