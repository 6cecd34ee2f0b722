"""What every video tokenizer of nbp_ds answers (the project's own, ``nbp_ds.tokenizer.model``, and the port
of the NBP authors' released one, ``nbp_ds.tokenizer.official``): its identity, the clip shapes it takes
and the token grid they give, its device; ``encode`` (uint8 video -> codes) and ``decode`` (the reverse).

Time is causal and compressed by ``temporal_factor`` (clips of 1 + f*k frames give 1 + k latent frames: the
first frame stands alone), space by ``spatial_factor``.

``decode_long`` decodes a long token video in pieces of a few latent frames, each after as many latent frames
of its past as the decoder's output can depend on (``temporal_reach``, measured once by probing the decoder), so
its working memory does not grow with the video's length and its frames are those of decoding it whole: a
frame's inputs are the same in both, and a causal decoder looks no further back.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from nbp_ds.errors import UsageError


class TokenizerError(UsageError, ValueError):
    """A tokenizer that cannot be loaded, or a clip shape it cannot take; the message names it."""


class TokenizerNotFound(TokenizerError, FileNotFoundError):
    """No tokenizer where one was named."""


DEFAULT_PIECE_FRAMES = 8  # latent frames decode_long decodes per piece at least, after the piece's past
REACH_PROBE_FRAMES = 16  # latent frames of the first probe that measures a decoder's temporal reach
MAX_REACH_PROBE_FRAMES = 256


def run_layers(layers: Iterable[nn.Module], x: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
    """``x`` through ``layers`` in turn. ``checkpointed`` (while gradients are on) keeps only each layer's input
    and recomputes its activations in backward: the paper-size tokenizer's activations at 17x128x128 are what
    fills a GPU's memory, its weights are small."""
    recompute = checkpointed and torch.is_grad_enabled()
    for layer in layers:
        x = checkpoint(layer, x, use_reentrant=False) if recompute else layer(x)
    return x


class VideoTokenizerBase(nn.Module):
    temporal_factor: int
    spatial_factor: int
    # training only, not part of the architecture (see run_layers); the trainer sets it from the run config
    activation_checkpointing: bool = False

    @property
    def name(self) -> str:
        raise NotImplementedError

    @property
    def version(self) -> str:
        raise NotImplementedError

    @property
    def codebook_size(self) -> int:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def check_clip_shape(self, frames: int, height: int, width: int) -> None:
        f, s = self.temporal_factor, self.spatial_factor
        if frames < 1 or (frames - 1) % f:
            raise TokenizerError(f"tokenizer '{self.name}': clips need 1 + {f}k frames (1, {1 + f}, {1 + 2 * f}, "
                                 f"...), got {frames}")
        if height % s or width % s:
            raise TokenizerError(f"tokenizer '{self.name}': frame size must be a multiple of {s}, "
                                 f"got {height}x{width}")

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """The token grid (T', H', W') for a clip of `frames` x `height` x `width`."""
        self.check_clip_shape(frames, height, width)
        f, s = self.temporal_factor, self.spatial_factor
        return 1 + (frames - 1) // f, height // s, width // s

    # ---- uint8 paths (tokenizing, sampling) -------------------------------------------------------
    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """uint8 video [B, N, H, W, 3] -> code indices [B, T', H', W'] (long)."""
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"encode expects uint8 video [B, N, H, W, 3], got shape {tuple(video.shape)}")
        self.check_clip_shape(*video.shape[1:4])
        _, indices = self.fsq(self.video_to_latents(video.to(self.device)).permute(0, 2, 3, 4, 1))
        return indices

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Code indices [B, T', H', W'] -> uint8 video [B, 1 + f(T'-1), s H', s W', 3]."""
        if tokens.ndim != 4:
            raise ValueError(f"decode expects tokens [B, T, H, W], got shape {tuple(tokens.shape)}")
        values = self.fsq.indices_to_values(tokens.to(self.device))
        return self.latents_to_video(values.permute(0, 4, 1, 2, 3))

    @torch.no_grad()
    def decode_long(self, tokens: torch.Tensor, piece_frames: int | None = None) -> torch.Tensor:
        """``decode`` for a token video of any length, ``piece_frames`` latent frames at a time (default: the
        reach, at least DEFAULT_PIECE_FRAMES, so that the past decoded again costs at most as much as the piece):
        code indices [B, T', H', W'] -> uint8 video [B, 1 + f(T'-1), s H', s W', 3] (on the host: the pieces are
        moved there as they come). Each piece is decoded after ``temporal_reach`` latent frames of its past and
        keeps only its own frames, which are then those of decoding the video whole."""
        if tokens.ndim != 4:
            raise ValueError(f"decode_long expects tokens [B, T, H, W], got shape {tuple(tokens.shape)}")
        if piece_frames is None:
            piece_frames = max(DEFAULT_PIECE_FRAMES, self.temporal_reach)
        if piece_frames < 1:
            raise ValueError(f"piece_frames must be >= 1, got {piece_frames}")
        b, n, h, w = tokens.shape
        f, s = self.temporal_factor, self.spatial_factor
        reach = self.temporal_reach
        if n <= piece_frames + reach:
            return self.decode(tokens).cpu()
        video = torch.empty(b, 1 + f * (n - 1), s * h, s * w, 3, dtype=torch.uint8)
        video[:, : 1 + f * (piece_frames - 1)] = self.decode(tokens[:, :piece_frames]).cpu()
        for start in range(piece_frames, n, piece_frames):
            end = min(start + piece_frames, n)
            past = max(0, start - reach)
            piece = self.decode(tokens[:, past:end])
            video[:, 1 + f * (start - 1): 1 + f * (end - 1)] = piece[:, -f * (end - start):].cpu()
        return video

    @cached_property
    def temporal_reach(self) -> int:
        """How many latent frames before its own a decoded frame can depend on, plus one (the first frame of a
        piece is decoded as a video's first frame is). Measured once: the decoder's float output for random values
        (one latent pixel per frame) and the same with latent frame 1 changed; the last frame that moved says how
        far a change reaches. The probe doubles in length until the change dies out before its end."""
        f = self.temporal_factor
        param = next(self.parameters())
        g = torch.Generator().manual_seed(0)
        frames = REACH_PROBE_FRAMES
        while frames <= MAX_REACH_PROBE_FRAMES:
            values = torch.rand(1, self.fsq.dim, frames, 1, 1, generator=g) * 2 - 1
            changed = values.clone()
            changed[:, :, 1] = -changed[:, :, 1]
            with torch.no_grad():
                outputs = [self.decode_values_float(v.to(param.device, param.dtype)) for v in (values, changed)]
            moved = (outputs[0] != outputs[1]).flatten(3).any(-1).any(1).squeeze(0).nonzero().flatten()
            last_latent = (int(moved[-1]) - 1) // f + 1
            if last_latent < frames - 1:
                return last_latent  # reaches last_latent - 1 frames back, plus the piece's first frame
            frames *= 2
        raise TokenizerError(f"tokenizer '{self.name}': a change of latent frame 1 still moves the last frame of a "
                             f"{MAX_REACH_PROBE_FRAMES}-frame probe: its decoder is not causal with a bounded "
                             f"reach, so it cannot decode in pieces")

    def decode_values_float(self, values: torch.Tensor) -> torch.Tensor:
        """Quantized values [B, C, T', H', W'] -> the decoder's float output [B, 3, N, H, W] (before uint8)."""
        raise NotImplementedError

    def video_to_latents(self, video: torch.Tensor) -> torch.Tensor:
        """uint8 video [B, N, H, W, 3] on the device -> latents before quantization [B, C, T', H', W']."""
        raise NotImplementedError

    def latents_to_video(self, values: torch.Tensor) -> torch.Tensor:
        """Quantized values [B, C, T', H', W'] -> uint8 video [B, N, H, W, 3]."""
        raise NotImplementedError

    def clip_shape(self, grid: tuple[int, int, int] | list[int]) -> tuple[int, int, int]:
        """The clip (frames, height, width) that encodes to the token grid (T', H', W'): latent_shape's inverse."""
        t, h, w = grid
        f, s = self.temporal_factor, self.spatial_factor
        return 1 + (t - 1) * f, h * s, w * s
