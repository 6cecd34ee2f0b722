"""Drawing tokens from logits, on the device: temperature, top-k, top-p, classifier-free guidance, and the
counter-based random stream every video draws from.

Nothing here reads a value back to the host, so a decoding step built from these functions can run a whole
video without synchronising (and be captured in a CUDA graph).

Random draws are a pure function of (seed, video index, token position): ``video_keys`` hashes the first two
into one key per video, ``stream_uniforms`` hashes a key with the positions a pass samples. A video's tokens
therefore depend neither on the batch it was generated in nor on the order of the passes, which is what lets
``nbp-sample`` resume an interrupted run with the same per-video seeds, and the eager and the static decoder
draw identical tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# the NBP paper's sampling for its reported FVD (the authors' evaluation scripts): no classifier-free guidance
PAPER_SAMPLING = {"temperature": 1.0, "top_k": 16000, "top_p": 0.9, "cfg_scale": None}
# the quickstart's sampling (nbp-quickstart's and nbp-bench-quality's defaults): a nucleus draws the near-certain
# tokens (most of a video) from their one or two likeliest codes and the uncertain ones (where the object starts, its
# colour) from several, which kept shape and colour more often than the 4 or 3 likeliest codes everywhere; guidance
# keeps the class' motion, and more of it (2, 3) pushes the object's colour off the palette: guidance 1.5 kept one
# colour 10 points more often than 2 on both training runs measured, a nucleus of 60% (docs/quality.md)
QUICKSTART_SAMPLING = {"temperature": 1.0, "top_k": None, "top_p": 0.6, "cfg_scale": 1.5}


@dataclass(frozen=True)
class Sampling:
    """How tokens are drawn: temperature (0 = greedy), top-k, top-p, classifier-free guidance scale (None = off)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (or None), got {self.top_p}")

    @property
    def guided(self) -> bool:
        return self.cfg_scale is not None and self.cfg_scale != 1.0


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Mask logits [..., V] outside the top-k and/or the nucleus of mass top_p with -inf."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)`` (scale 1 gives cond, 0 gives uncond)."""
    return uncond + scale * (cond - uncond)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Tokens [...] drawn from probs [..., V] (unnormalised is fine) by uniforms u [...] in [0, 1).

    Token i owns the draws in [cdf(i-1), cdf(i)), so a token of probability 0 owns none: the search takes
    the first token whose cdf *exceeds* the draw (a left-side search would give token 0 at u = 0 even when
    the filters removed it).
    """
    cdf = probs.cumsum(-1)
    found = torch.searchsorted(cdf, u.unsqueeze(-1).to(cdf.dtype) * cdf[..., -1:], right=True).squeeze(-1)
    # a draw that rounds up to the total (u just below 1 cast to a coarser dtype) finds no token: it belongs
    # to the last token with mass, not to trailing zeros
    last_with_mass = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    return torch.minimum(found, last_with_mass)


def sample_tokens(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                  generator: torch.Generator | None = None, uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, n, V] -> tokens [B, n]; temperature 0 means greedy.

    Each token is drawn by inverse CDF from one uniform in [0, 1) (torch.multinomial is ~20x slower on CPU at
    64k codes): ``uniforms`` [B, n] when given (the decoders pass ``stream_uniforms``), else drawn from
    ``generator``."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    if uniforms is None:
        uniforms = torch.rand(probs.shape[:-1], device=probs.device, generator=generator, dtype=probs.dtype)
    return inverse_cdf(probs, uniforms)


def draw_tokens(logits: torch.Tensor, sampling: Sampling, keys: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Tokens [B, n] for one pass: logits [rows, n, V] (rows = 2B under guidance: conditional, then null-class
    rows), the videos' stream keys [B] and the raster positions [n] of the tokens drawn (their uniforms)."""
    if sampling.guided:
        logits = guided_logits(*logits.chunk(2), sampling.cfg_scale)
    uniforms = stream_uniforms(keys, targets) if sampling.temperature > 0 else None
    return sample_tokens(logits, sampling.temperature, sampling.top_k, sampling.top_p, uniforms=uniforms)


# ---- the counter-based random stream --------------------------------------------------------------------------
# 32-bit words held in int64 tensors: every product below stays under 2**63, so the arithmetic is exact on
# every device (no reliance on signed overflow) and identical on the CPU and the GPU.
_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) and a 32-bit constant c, in two 16-bit halves of c."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (Chris Wellons' "lowbias32") of int64 tensors in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def check_seed(seed: object, name: str = "seed") -> None:
    """Refuse a seed ``video_keys`` cannot take (anything but a non-negative int), naming it as ``name``."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{name} must be a non-negative int, got {seed!r}")


def video_keys(seed: int, video_index: torch.Tensor) -> torch.Tensor:
    """One 32-bit stream key per video [B] from a seed (any non-negative int) and the videos' indices [B]."""
    index = video_index.long()
    key = mix32(torch.full_like(index, (seed >> 32) & _MASK32))
    key = mix32(key ^ (seed & _MASK32))
    key = mix32(key ^ (index & _MASK32))
    return mix32(key ^ ((index >> 32) & _MASK32))


def stream_uniforms(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) [B, n] (float32, 24 random bits) for videos' keys [B] at token positions [n]."""
    h = mix32(keys.unsqueeze(-1) ^ mix32(positions.long().unsqueeze(0)))
    h = mix32(h ^ positions.long().unsqueeze(0))
    return (h >> 8).float() * 2.0**-24
