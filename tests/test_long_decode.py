"""Decoding long token videos in pieces (VideoTokenizerBase.decode_long): each piece is decoded after the
decoder's temporal reach, so the pieces never hold more than piece + reach latent frames whatever the video's
length, and the frames are those of decoding the video whole: bit for bit with nbp_ds' tokenizer, within one
uint8 level of float rounding with the released tokenizer's architecture (its reach is ~55 latent frames)."""

from __future__ import annotations

import pytest
import torch

from nbp_ds.tokenizer import build_tokenizer
from nbp_ds.tokenizer.official import OfficialTokenizer


def pieces_seen(tokenizer, monkeypatch) -> list[int]:
    """Latent frames of every decode call decode_long makes."""
    seen: list[int] = []
    original = type(tokenizer).decode

    def spy(self, tokens):
        seen.append(tokens.shape[1])
        return original(self, tokens)

    monkeypatch.setattr(type(tokenizer), "decode", spy)
    return seen


def test_nbp_ds_tokenizer_decodes_in_bounded_pieces_bit_for_bit(monkeypatch):
    tokenizer = build_tokenizer("tiny", seed=1).eval()
    reach = tokenizer.temporal_reach
    # its decoder: conv_in, 2 res blocks per stage with two time-kernel-3 convs, upsampling convs; a change of one
    # latent frame moves the next few, never the whole video
    assert 2 <= reach <= 8
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, tokenizer.codebook_size, (2, 3 * reach + 10, 2, 3), generator=g)
    whole = tokenizer.decode(tokens)
    seen = pieces_seen(tokenizer, monkeypatch)
    for piece in (1, 3, 7):
        seen.clear()
        video = tokenizer.decode_long(tokens, piece)
        assert video.shape == whole.shape == (2, 1 + 4 * (tokens.shape[1] - 1), 8, 12, 3)
        assert torch.equal(video, whole), piece
        assert max(seen) <= piece + reach and len(seen) == -(-tokens.shape[1] // piece)
    # two frames less of past is not exact: the measured reach is needed (up to its one frame of margin for a
    # piece's first frame)
    monkeypatch.setitem(tokenizer.__dict__, "temporal_reach", reach - 2)  # the cached value
    assert not torch.equal(tokenizer.decode_long(tokens, 1), whole)


@pytest.mark.slow
def test_released_tokenizer_architecture_decodes_in_pieces(monkeypatch):
    """The released architecture (width 32, random weights): its reach is measured (its latent stage alone has 17
    causal convolutions of kernel 3), and piecewise decoding gives the whole decode's frames to one uint8 level
    (the convolutions see inputs of other lengths and round differently, rarely)."""
    torch.manual_seed(0)
    tokenizer = OfficialTokenizer(32).eval()
    with torch.no_grad():
        for name, p in tokenizer.named_parameters():
            if name.endswith("beta"):
                p.uniform_(0.5, 1.5)
    reach = tokenizer.temporal_reach
    assert 34 <= reach <= 64
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, tokenizer.codebook_size, (1, reach + 2 * 8, 1, 1), generator=g)
    whole = tokenizer.decode(tokens)
    seen = pieces_seen(tokenizer, monkeypatch)
    video = tokenizer.decode_long(tokens, 8)
    assert max(seen) <= 8 + reach and len(seen) == -(-tokens.shape[1] // 8)
    difference = (video.int() - whole.int()).abs()
    assert video.shape == whole.shape and int(difference.max()) <= 1 and float((difference > 0).float().mean()) < 0.01
