"""What every video tokenizer of nbp_ds answers (the project's own, ``nbp_ds.tokenizer.model``, and the port
of the NBP authors' released one, ``nbp_ds.tokenizer.official``): its identity, the clip shapes it takes
and the token grid they give, its device; ``encode`` (uint8 video -> codes) and ``decode`` (the reverse).

Time is causal and compressed by ``temporal_factor`` (clips of 1 + f*k frames give 1 + k latent frames: the
first frame stands alone), space by ``spatial_factor``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from nbp_ds.errors import UsageError


class TokenizerError(UsageError, ValueError):
    """A tokenizer that cannot be loaded, or a clip shape it cannot take; the message names it."""


class TokenizerNotFound(TokenizerError, FileNotFoundError):
    """No tokenizer where one was named."""


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
