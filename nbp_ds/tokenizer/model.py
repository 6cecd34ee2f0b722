"""A MAGVIT-v2-style causal 3D CNN video tokenizer with FSQ.

Causality in time is what lets the first frame stand alone: every temporal convolution pads only the past
(the first frame is replicated), strided convolutions halve time as 1 + 2k -> 1 + k, the decoder's
depth-to-space upsampling doubles it back as 1 + k -> 1 + 2k, and normalization is per frame. So
17 frames -> 5 latent frames (the first alone, then 4 frames each) and latent frame t depends only on
video frames <= 4t. Spatially the presets downsample 4x (`tiny`) or 8x (`small`, `paper`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from nbp_ds.files import atomic_output, write_text_atomic
from nbp_ds.tokenizer.base import TokenizerError, TokenizerNotFound, VideoTokenizerBase, run_layers
from nbp_ds.tokenizer.fsq import FSQ
from nbp_ds.tokenizer.official import load_official_tokenizer

TEMPORAL_STAGES = 2  # two 2x temporal downsamplings: 1 + 4k frames -> 1 + k latent frames


@dataclass
class TokenizerConfig:
    """Architecture of a tokenizer; saved as config.json next to its weights."""

    name: str = "tiny"
    levels: list[int] = field(default_factory=lambda: [4, 4, 4])
    channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # one stage per entry
    res_blocks: int = 1
    patch_size: int = 1  # pixel-unshuffle p x p before the first conv: full-resolution convs cost the most
    spatial_downsample: int | None = None  # stage transitions that halve space (the first ones; default all)
    # time extent of the convolutions that do not resample time. 3 is MAGVIT-v2's full 3D; 1 leaves all temporal
    # mixing to the temporal down/upsampling convs, which keeps causality and learns several times faster
    temporal_kernel: int = 3
    # a linear path beside the CNN: each token's mean colour -> 1x1 conv -> latent, and latent -> 1x1 conv -> that
    # colour spread over the token's pixels, added to the decoder's output. The CNN then learns a residual over a
    # per-token colour: at the quickstart's size and 1,000 steps (MSE), shapes read 98% against 80%, colour 98% / 95%
    linear_skip: bool = False
    version: str = "untrained"

    def __post_init__(self) -> None:
        if len(self.channel_mult) - 1 < TEMPORAL_STAGES:
            raise ValueError(f"tokenizer channel_mult {self.channel_mult}: needs at least {TEMPORAL_STAGES + 1} "
                             f"entries (the two temporal downsamplings ride on the first stage transitions)")
        if self.temporal_kernel < 1:
            raise ValueError(f"tokenizer temporal_kernel must be >= 1, got {self.temporal_kernel}")
        if not 0 <= self.spatial_stages <= len(self.channel_mult) - 1 or self.patch_size < 1:
            raise ValueError(f"tokenizer spatial_downsample {self.spatial_downsample} / patch_size {self.patch_size} "
                             f"do not fit {len(self.channel_mult) - 1} stage transitions")

    @property
    def spatial_stages(self) -> int:
        return len(self.channel_mult) - 1 if self.spatial_downsample is None else self.spatial_downsample

    @property
    def spatial_factor(self) -> int:
        return self.patch_size * 2 ** self.spatial_stages

    @property
    def temporal_factor(self) -> int:
        return 2 ** TEMPORAL_STAGES


PRESETS: dict[str, TokenizerConfig] = {
    # 9x32x32 -> 3x8x8 with 1,000 codes: trains in minutes on a CPU (the quickstart and the tests)
    "tiny": TokenizerConfig("tiny", [8, 5, 5, 5], 32, [1, 2, 2], 1, patch_size=2, spatial_downsample=1,
                            temporal_kernel=1),
    # tiny with the linear path (linear_skip), the quickstart's: the same codes, grid and time per step, and
    # sharper shapes and truer colours after 1,000 steps (README, the quickstart)
    "tiny-skip": TokenizerConfig("tiny-skip", [8, 5, 5, 5], 32, [1, 2, 2], 1, patch_size=2, spatial_downsample=1,
                                 temporal_kernel=1, linear_skip=True),
    # 8x spatial with 1,000 codes: a CPU-sized stand-in for the paper's
    "small": TokenizerConfig("small", [8, 5, 5, 5], 64, [1, 2, 2], 1, patch_size=2),
    # the NBP paper's: 17x128x128 -> 5x16x16, FSQ [8,8,8,5,5,5] = 64,000 codes
    "paper": TokenizerConfig("paper", [8, 8, 8, 5, 5, 5], 128, [1, 2, 2, 4], 2),
}


class CausalConv3d(nn.Module):
    """3D convolution that pads time only on the past side (replicating the first frame)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: tuple[int, int, int] = (1, 1, 1),
                 time_kernel: int | None = None):
        super().__init__()
        time_kernel = kernel if time_kernel is None else time_kernel
        self.time_pad, self.space_pad = time_kernel - 1, kernel // 2
        self.conv = nn.Conv3d(c_in, c_out, (time_kernel, kernel, kernel), stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.space_pad
        return self.conv(F.pad(x, (p, p, p, p, self.time_pad, 0), mode="replicate"))


class FrameNorm(nn.Module):
    """GroupNorm over each frame separately: statistics across time would leak the future into the past."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(min(32, channels // 4) or 1, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, time_kernel: int = 3):
        super().__init__()
        self.norm1, self.conv1 = FrameNorm(c_in), CausalConv3d(c_in, c_out, time_kernel=time_kernel)
        self.norm2, self.conv2 = FrameNorm(c_out), CausalConv3d(c_out, c_out, time_kernel=time_kernel)
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Upsample(nn.Module):
    """2x space by nearest neighbour + conv; 2x time by depth-to-space, dropping the frame before the first
    (1 + k -> 1 + 2k), so the first latent frame still decodes to the first video frame alone."""

    def __init__(self, channels: int, temporal: bool, spatial: bool = True, time_kernel: int = 3):
        super().__init__()
        self.temporal, self.spatial = temporal, spatial
        self.time_conv = CausalConv3d(channels, 2 * channels) if temporal else None  # always sees the past
        self.conv = CausalConv3d(channels, channels, time_kernel=time_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_conv is not None:
            b, c, t, h, w = x.shape
            y = self.time_conv(x).reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
            x = y[:, :, 1:]
        if self.spatial:
            b, c, t, h, w = x.shape
            x = F.interpolate(x.transpose(1, 2).reshape(b * t, c, h, w), scale_factor=2.0, mode="nearest")
            x = x.reshape(b, t, c, 2 * h, 2 * w).transpose(1, 2)
        return self.conv(x)


class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig, latent_dim: int):
        super().__init__()
        ch = [cfg.channels * m for m in cfg.channel_mult]
        self.patch = cfg.patch_size
        tk = cfg.temporal_kernel
        self.conv_in = CausalConv3d(3 * self.patch ** 2, ch[0], time_kernel=tk)
        layers: list[nn.Module] = []
        c = ch[0]
        for i, c_out in enumerate(ch):
            for _ in range(cfg.res_blocks):
                layers.append(ResBlock(c, c_out, tk))
                c = c_out
            if i < len(ch) - 1:
                s = 2 if i < cfg.spatial_stages else 1
                temporal = i < TEMPORAL_STAGES  # a time-strided conv keeps a kernel of 3: it merges frames
                layers.append(CausalConv3d(c, c, stride=(2 if temporal else 1, s, s),
                                           time_kernel=3 if temporal else tk))
        layers.append(ResBlock(c, c, tk))
        self.blocks = nn.Sequential(*layers)
        self.norm_out, self.conv_out = FrameNorm(c), nn.Conv3d(c, latent_dim, 1)
        self.factors = (cfg.temporal_factor, cfg.spatial_factor)
        self.linear_skip = nn.Conv3d(3, latent_dim, 1) if cfg.linear_skip else None

    def forward(self, x: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
        z = run_layers(self.blocks, self.conv_in(space_to_depth(x, self.patch)), checkpointed)
        z = self.conv_out(F.silu(self.norm_out(z)))
        return z if self.linear_skip is None else z + self.linear_skip(token_means(x, *self.factors))


class Decoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig, latent_dim: int):
        super().__init__()
        ch = [cfg.channels * m for m in cfg.channel_mult]
        c, tk = ch[-1], cfg.temporal_kernel
        self.conv_in = CausalConv3d(latent_dim, c, time_kernel=tk)
        layers: list[nn.Module] = [ResBlock(c, c, tk)]
        for i in reversed(range(len(ch))):
            for _ in range(cfg.res_blocks):
                layers.append(ResBlock(c, ch[i], tk))
                c = ch[i]
            if i > 0:  # mirrors the encoder's downsampling after stage i - 1
                layers.append(Upsample(c, temporal=i - 1 < TEMPORAL_STAGES, spatial=i - 1 < cfg.spatial_stages,
                                       time_kernel=tk))
        self.blocks = nn.Sequential(*layers)
        self.patch = cfg.patch_size
        self.norm_out, self.conv_out = FrameNorm(c), CausalConv3d(c, 3 * self.patch ** 2, time_kernel=tk)
        self.factors = (cfg.temporal_factor, cfg.spatial_factor)
        self.linear_skip = nn.Conv3d(latent_dim, 3, 1) if cfg.linear_skip else None

    def forward(self, z: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
        x = run_layers(self.blocks, self.conv_in(z), checkpointed)
        x = depth_to_space(self.conv_out(F.silu(self.norm_out(x))), self.patch)
        return x if self.linear_skip is None else x + spread_over_tokens(self.linear_skip(z), *self.factors)


def token_means(x: torch.Tensor, temporal: int, spatial: int) -> torch.Tensor:
    """[B, C, 1 + temporal*k, H, W] -> [B, C, 1 + k, H/spatial, W/spatial]: the mean of the pixels each token covers
    (the first frame alone, then `temporal` frames per token, as the causal encoder groups them)."""
    b, c, n, h, w = x.shape
    frames = torch.cat([x[:, :, :1], x[:, :, 1:].reshape(b, c, (n - 1) // temporal, temporal, h, w).mean(3)], 2)
    return F.avg_pool3d(frames, (1, spatial, spatial))


def spread_over_tokens(y: torch.Tensor, temporal: int, spatial: int) -> torch.Tensor:
    """The inverse grouping of token_means: each token's value repeated over the pixels and frames it covers."""
    y = y.repeat_interleave(spatial, 3).repeat_interleave(spatial, 4)
    return torch.cat([y[:, :, :1], y[:, :, 1:].repeat_interleave(temporal, 2)], 2)


def space_to_depth(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, C*p*p, T, H/p, W/p], frame by frame."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    y = F.pixel_unshuffle(x.transpose(1, 2).reshape(b * t, c, h, w), p)
    return y.reshape(b, t, c * p * p, h // p, w // p).transpose(1, 2)


def depth_to_space(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of space_to_depth."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    y = F.pixel_shuffle(x.transpose(1, 2).reshape(b * t, c, h, w), p)
    return y.reshape(b, t, c // (p * p), h * p, w * p).transpose(1, 2)


class VideoTokenizer(VideoTokenizerBase):
    """Video <-> discrete tokens. `encode(uint8 [B,N,H,W,3]) -> long [B,T',H',W']`, `decode` the reverse."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.config = cfg
        self.temporal_factor, self.spatial_factor = cfg.temporal_factor, cfg.spatial_factor
        self.fsq = FSQ(cfg.levels)
        self.encoder = Encoder(cfg, self.fsq.dim)
        self.decoder = Decoder(cfg, self.fsq.dim)

    # ---- identity ---------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def version(self) -> str:
        return self.config.version

    @property
    def codebook_size(self) -> int:
        return self.fsq.codebook_size

    # ---- float paths (training) -------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x float [B,3,N,H,W] in [-1,1] -> (reconstruction, same shape; code indices [B,T',H',W']).

        Under bf16 autocast the latents are quantized in float32: rounding them in bf16 would move codes."""
        z = self.encoder(x, self.activation_checkpointing).float().permute(0, 2, 3, 4, 1)
        values, indices = self.fsq(z)
        return self.decoder(values.permute(0, 4, 1, 2, 3).to(x.dtype), self.activation_checkpointing), indices

    @property
    def output_weight(self) -> torch.Tensor:
        """The decoder's last convolution's weight (where the adaptive GAN weight compares gradients)."""
        return self.decoder.conv_out.conv.weight

    # ---- uint8 paths (tokenizing, sampling) -------------------------------------------------------
    def video_to_latents(self, video: torch.Tensor) -> torch.Tensor:
        return self.encoder(to_float(video))

    def latents_to_video(self, values: torch.Tensor) -> torch.Tensor:
        return to_uint8(self.decoder(values))

    def decode_values_float(self, values: torch.Tensor) -> torch.Tensor:
        return self.decoder(values)

    # ---- files ------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write tokenizer.safetensors + config.json; the version becomes a hash of the weights."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        digest = hashlib.sha256()
        for key in sorted(state):
            digest.update(key.encode())
            digest.update(state[key].numpy().tobytes())
        self.config.version = digest.hexdigest()[:12]
        with atomic_output(folder / "tokenizer.safetensors") as tmp:
            save_file(state, str(tmp))
        write_text_atomic(folder / "config.json", json.dumps(asdict(self.config), indent=1) + "\n")
        return folder


def to_float(video: torch.Tensor) -> torch.Tensor:
    """uint8 [B, N, H, W, 3] -> float [B, 3, N, H, W] in [-1, 1]."""
    return video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [B, 3, N, H, W] in [-1, 1] -> uint8 [B, N, H, W, 3]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()


def build_tokenizer(preset: str, seed: int = 0) -> VideoTokenizer:
    """An untrained tokenizer of a preset (weights from `seed`): for tests, dry runs and training from scratch."""
    if preset not in PRESETS:
        raise TokenizerError(f"unknown tokenizer preset '{preset}'; presets: {', '.join(PRESETS)}")
    cfg = TokenizerConfig(**asdict(PRESETS[preset]))
    cfg.version = f"random-seed{seed}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VideoTokenizer(cfg)


def load_tokenizer(spec: str | Path, device: str | torch.device = "cpu") -> VideoTokenizer:
    """`random:<preset>[:seed]` for an untrained one, `official:PATH` for a tokenizer the NBP authors released
    (magvit2_*.pt or its .safetensors copy; nbp_ds.tokenizer.official.OfficialTokenizer, same interface), else
    a folder written by `VideoTokenizer.save` (or a nbp-train-tokenizer run folder, which holds it as
    `tokenizer/`). Returned in eval mode. Loading draws nothing from torch's global generator."""
    # the layers are built on the CPU with initial weights drawn from the global generator, then replaced by the
    # file's: without the fork a caller inside a training run (a sample hook) would shift that run's random stream
    with torch.random.fork_rng(devices=[]):
        return _load_tokenizer(str(spec), device)


def _load_tokenizer(spec: str, device: str | torch.device) -> VideoTokenizer:
    if spec.startswith("official:"):
        return load_official_tokenizer(spec.removeprefix("official:"), device=device)
    if spec.startswith("random:"):
        _, preset, *seed = spec.split(":")
        tokenizer = build_tokenizer(preset, int(seed[0]) if seed else 0)
    else:
        folder = Path(spec)
        if (folder / "tokenizer" / "config.json").is_file():
            folder = folder / "tokenizer"
        if not (folder / "config.json").is_file() or not (folder / "tokenizer.safetensors").is_file():
            raise TokenizerNotFound(f"tokenizer {spec}: expected a folder with config.json and tokenizer.safetensors "
                                    f"(written by nbp-train-tokenizer), official:PATH (a released magvit2_*.pt) "
                                    f"or random:<preset> with presets {', '.join(PRESETS)}")
        try:
            saved = json.loads((folder / "config.json").read_text())
        except ValueError as exc:
            raise TokenizerError(f"tokenizer {folder / 'config.json'}: not JSON ({exc})") from exc
        if saved.get("architecture") == "official":  # a fine-tuned released tokenizer (OfficialTokenizer.save)
            return load_official_tokenizer(folder / "tokenizer.safetensors", device=device, name=saved.get("name"))
        try:
            cfg = TokenizerConfig(**saved)
        except (TypeError, ValueError) as exc:
            raise TokenizerError(f"tokenizer {folder / 'config.json'}: {exc}") from exc
        tokenizer = VideoTokenizer(cfg)
        tokenizer.load_state_dict(load_file(str(folder / "tokenizer.safetensors")))
    return tokenizer.to(device).eval()
